// stable_diffusion.hpp: a header-only C++17 RAII wrapper over the C ABI in stable_diffusion.h.
//
//     sd::Pipeline pipe("path/to/model");
//     sd::Params p;
//     p.prompt = "a lighthouse at dusk";
//     p.steps = 20;
//     sd::Images images = pipe.generate(p, [](const sd::Step& s) {
//         std::printf("%u/%u\n", s.step(), s.total());
//         return true;  // false cancels
//     });
//     const sd_image& img = images[0];  // img.data, img.width, img.height, img.stride
//
// Failures throw sd::Error (status() and what() carry the code and message). An exception
// thrown by a callback cancels the run and is rethrown from the call that ran it; it never
// crosses the C library. Handles are movable, not copyable; destructors release them.
#ifndef STABLE_DIFFUSION_HPP
#define STABLE_DIFFUSION_HPP

#include "stable_diffusion.h"

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sd {

/// A failed call: the library's status code and message.
class Error : public std::runtime_error {
 public:
  Error(sd_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  sd_status status() const noexcept { return status_; }

 private:
  sd_status status_;
};

namespace detail {

/// Throws the thread's last error when `status` is not SD_OK.
inline void check(sd_status status) {
  if (status != SD_OK) {
    throw Error(status, sd_last_error());
  }
}

inline const char* c_str_or_null(const std::string& s) { return s.empty() ? nullptr : s.c_str(); }

}  // namespace detail

/// The step being reported to a callback: valid only during the callback.
class Step {
 public:
  explicit Step(const sd_step_info* info) : info_(info) {}
  uint32_t step() const { return info_->step; }
  uint32_t total() const { return info_->total; }
  double timestep() const { return info_->timestep; }
  double elapsed_seconds() const { return info_->elapsed_seconds; }
  uint32_t batch() const { return info_->batch; }
  const sd_step_info& info() const { return *info_; }

  /// A cheap RGB preview (latent resolution) of image `index`; valid during the callback.
  const sd_image& preview(uint32_t index = 0) const {
    const sd_image* image = nullptr;
    detail::check(sd_step_preview(info_, index, &image));
    return *image;
  }

  /// A copy of the current latents, [batch][channels][height][width].
  std::vector<float> latents() const {
    std::vector<float> out(static_cast<size_t>(info_->batch) * info_->latent_channels *
                           info_->latent_height * info_->latent_width);
    detail::check(sd_step_latents(info_, out.data(), out.size()));
    return out;
  }

 private:
  const sd_step_info* info_;
};

/// Return true to go on, false to cancel the run.
using StepCallback = std::function<bool(const Step&)>;
using LogCallback = std::function<void(sd_log_level, const std::string&)>;

/// Owned images (moved out of a generate call or a job).
class Images {
 public:
  Images() = default;
  explicit Images(sd_images* images) : images_(images) {}

  size_t size() const {
    size_t n = 0;
    if (images_) detail::check(sd_images_count(images_.get(), &n));
    return n;
  }

  /// Image `index`: owned by this object, valid while it lives.
  const sd_image& operator[](size_t index) const {
    const sd_image* image = nullptr;
    detail::check(sd_images_get(images_.get(), index, &image));
    return *image;
  }

 private:
  struct Free {
    void operator()(sd_images* images) const { sd_images_free(images); }
  };
  std::unique_ptr<sd_images, Free> images_;
};

/// A LoRA file read once (sd_lora_load); apply it to any call with Params::add_lora.
class Lora {
 public:
  explicit Lora(const std::string& path) {
    sd_lora* l = nullptr;
    detail::check(sd_lora_load(path.c_str(), &l));
    lora_.reset(l);
  }
  const sd_lora* get() const { return lora_.get(); }

 private:
  struct Free {
    void operator()(sd_lora* l) const { sd_lora_free(l); }
  };
  std::unique_ptr<sd_lora, Free> lora_;
};

/// What to generate; defaults are the library's (sd_generate_params_init).
struct Params {
  std::string prompt;
  std::string negative_prompt;
  std::string scheduler;  // empty: the pipeline's
  uint32_t steps, batch, width, height, clip_skip, output_channels;
  double guidance, strength, eta;
  uint64_t seed;
  const sd_image* init_image = nullptr;  // borrowed for the call
  const sd_image* mask = nullptr;        // borrowed for the call
  bool paste_back;
  std::string prompt_2;           // SDXL's second encoder; empty: `prompt`
  std::string negative_prompt_2;  // empty: `negative_prompt`
  double guidance_rescale;
  /// SDXL: a refiner pipeline (Pipeline::get()) that finishes the last part of the schedule
  /// from this pipeline's latents; nullptr: none. Borrowed for the call.
  const sd_pipeline* refiner = nullptr;
  double refiner_start;  // the fraction where the refiner takes over, in (0, 1)
  sd_prompt_syntax prompt_syntax;  // SD_PROMPT_PLAIN (default) or SD_PROMPT_A1111
  /// This call's LoRAs; each Lora must outlive the calls that use it (a job keeps its own).
  std::vector<sd_lora_weight> loras;
  sd_seamless seamless;       // SD_SEAMLESS_NONE (default), _X, _Y or _XY: a tileable image
  sd_vae_tiling vae_tiling;   // SD_VAE_TILING_AUTO (default), _ON or _OFF
  uint32_t vae_tile_size;     // pixels; 0: the VAE's sample_size
  bool tiny_vae_decode;       // decode with LoadOptions::tiny_vae instead of the VAE

  /// Applies `lora` at `weight` (1: as trained; may be negative) to this call.
  Params& add_lora(const Lora& lora, double weight = 1.0) {
    loras.push_back(sd_lora_weight{lora.get(), weight});
    return *this;
  }

  Params() {
    sd_generate_params d;
    detail::check(sd_generate_params_init(&d, sizeof d));
    steps = d.steps;
    batch = d.batch;
    width = d.width;
    height = d.height;
    clip_skip = d.clip_skip;
    output_channels = d.output_channels;
    guidance = d.guidance;
    strength = d.strength;
    eta = d.eta;
    seed = d.seed;
    paste_back = d.paste_back != 0;
    guidance_rescale = d.guidance_rescale;
    refiner_start = d.refiner_start;
    prompt_syntax = d.prompt_syntax;
    seamless = d.seamless;
    vae_tiling = d.vae_tiling;
    vae_tile_size = d.vae_tile_size;
    tiny_vae_decode = d.tiny_vae_decode != 0;
  }

  /// The C struct; its strings point into this object.
  sd_generate_params to_c() const {
    sd_generate_params c;
    detail::check(sd_generate_params_init(&c, sizeof c));
    c.prompt = prompt.c_str();
    c.negative_prompt = detail::c_str_or_null(negative_prompt);
    c.scheduler = detail::c_str_or_null(scheduler);
    c.steps = steps;
    c.batch = batch;
    c.width = width;
    c.height = height;
    c.clip_skip = clip_skip;
    c.output_channels = output_channels;
    c.guidance = guidance;
    c.strength = strength;
    c.eta = eta;
    c.seed = seed;
    c.init_image = init_image;
    c.mask = mask;
    c.paste_back = paste_back ? 1 : 0;
    c.prompt_2 = detail::c_str_or_null(prompt_2);
    c.negative_prompt_2 = detail::c_str_or_null(negative_prompt_2);
    c.guidance_rescale = guidance_rescale;
    c.refiner = refiner;
    c.refiner_start = refiner_start;
    c.prompt_syntax = prompt_syntax;
    c.loras = loras.empty() ? nullptr : loras.data();
    c.lora_count = loras.size();
    c.seamless = seamless;
    c.vae_tiling = vae_tiling;
    c.vae_tile_size = vae_tile_size;
    c.tiny_vae_decode = tiny_vae_decode ? 1 : 0;
    return c;
  }
};

namespace detail {

/// Carries a C++ callback through the C ABI; an exception is parked and rethrown later.
struct StepState {
  StepCallback callback;
  std::exception_ptr error;

  static int32_t trampoline(const sd_step_info* info, void* user_data) noexcept {
    auto* self = static_cast<StepState*>(user_data);
    try {
      return self->callback(Step(info)) ? SD_STEP_CONTINUE : SD_STEP_CANCEL;
    } catch (...) {
      self->error = std::current_exception();
      return SD_STEP_CANCEL;
    }
  }

  void install(sd_generate_params& c) {
    if (callback) {
      c.on_step = &StepState::trampoline;
      c.step_user_data = this;
    }
  }

  /// Rethrows the callback's exception, else throws on a failed status.
  void finish(sd_status status) const {
    if (error) std::rethrow_exception(error);
    check(status);
  }
};

struct LogState {
  LogCallback callback;

  static void trampoline(sd_log_level level, const char* message, void* user_data) noexcept {
    try {
      static_cast<LogState*>(user_data)->callback(level, message);
    } catch (...) {
      // A logger that throws loses that message; nothing crosses into the library.
    }
  }
};

}  // namespace detail

/// A generate call on a worker thread. Destroying it cancels the run and waits for it.
class Job {
 public:
  Job(Job&&) noexcept = default;
  Job& operator=(Job&& other) noexcept {
    if (this != &other) {
      job_.reset();  // stop the old worker before its callback state goes
      state_ = std::move(other.state_);
      job_ = std::move(other.job_);
    }
    return *this;
  }

  sd_job_progress progress() const {
    sd_job_progress p{};
    p.struct_size = sizeof p;
    detail::check(sd_job_poll(job_.get(), &p));
    return p;
  }

  void cancel() { detail::check(sd_job_cancel(job_.get())); }

  /// True when the job finished successfully, false when `timeout` passed first; throws when
  /// it failed or was cancelled (rethrowing the callback's exception if it threw).
  bool wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) {
    sd_status status = sd_job_wait(job_.get(), static_cast<int64_t>(timeout.count()));
    if (status == SD_NOT_READY) return false;
    state_->finish(status);
    return true;
  }

  /// The images of a finished job (once).
  Images take_images() {
    sd_images* images = nullptr;
    sd_status status = sd_job_take_images(job_.get(), &images);
    state_->finish(status);
    return Images(images);
  }

 private:
  friend class Pipeline;
  Job(sd_job* job, std::unique_ptr<detail::StepState> state)
      : state_(std::move(state)), job_(job) {}

  struct Free {
    void operator()(sd_job* job) const { sd_job_free(job); }
  };
  // Declared before job_, so destroyed after it: the callback state outlives the worker.
  std::unique_ptr<detail::StepState> state_;
  std::unique_ptr<sd_job, Free> job_;
};

/// Load options; defaults are the library's (sd_load_options_init).
struct LoadOptions {
  std::string device;      // empty: "cpu"
  std::string scheduler;   // empty: the model's
  sd_dtype dtype = SD_DTYPE_FP32;
  std::string config_dir;  // single files: a diffusers folder's configs; empty: detected
  bool use_ema = false;
  bool copy_weights = false;
  sd_weights weights = SD_WEIGHTS_AUTO;  // the kernels for float32 on the CPU
  std::string lora_dir;  // where <lora:NAME:W> tags of A1111 prompts find NAME.safetensors
  std::string embeddings_dir;  // textual-inversion embeddings, used in prompts by file name
  std::string tiny_vae;  // a tiny autoencoder (TAESD): full-size previews, optional fast decode
  uint32_t num_threads = 0;  // CPU threads for this pipeline's calls; 0: the process default
};

/// A loaded model. Calls on one Pipeline are serialised by the library.
class Pipeline {
 public:
  explicit Pipeline(const std::string& model_path, const LoadOptions& options = {}) {
    sd_load_options o;
    detail::check(sd_load_options_init(&o, sizeof o));
    o.device = detail::c_str_or_null(options.device);
    o.scheduler = detail::c_str_or_null(options.scheduler);
    o.dtype = options.dtype;
    o.config_dir = detail::c_str_or_null(options.config_dir);
    o.use_ema = options.use_ema ? 1 : 0;
    o.copy_weights = options.copy_weights ? 1 : 0;
    o.plain_weights = options.weights;
    o.lora_dir = detail::c_str_or_null(options.lora_dir);
    o.embeddings_dir = detail::c_str_or_null(options.embeddings_dir);
    o.tiny_vae = detail::c_str_or_null(options.tiny_vae);
    o.num_threads = options.num_threads;
    sd_pipeline* p = nullptr;
    detail::check(sd_pipeline_load(model_path.c_str(), &o, &p));
    pipeline_.reset(p);
  }
  Pipeline(Pipeline&&) noexcept = default;
  Pipeline& operator=(Pipeline&& other) noexcept {
    if (this != &other) {
      pipeline_.reset();  // no log callback runs after this
      log_ = std::move(other.log_);
      retired_logs_ = std::move(other.retired_logs_);
      pipeline_ = std::move(other.pipeline_);
    }
    return *this;
  }

  /// Routes this pipeline's log messages to `callback` (empty: off).
  void set_logger(LogCallback callback) {
    auto state = std::make_unique<detail::LogState>();
    state->callback = std::move(callback);
    bool on = static_cast<bool>(state->callback);
    detail::check(sd_pipeline_set_log_callback(
        pipeline_.get(), on ? &detail::LogState::trampoline : nullptr, on ? state.get() : nullptr));
    // The previous state may still be in use by a call running on another thread: keep it.
    retired_logs_.push_back(std::move(log_));
    log_ = std::move(state);
  }

  Images generate(const Params& params, StepCallback on_step = {}) {
    detail::StepState state{std::move(on_step), nullptr};
    sd_generate_params c = params.to_c();
    state.install(c);
    sd_images* images = nullptr;
    sd_status status = sd_generate(pipeline_.get(), &c, &images);
    Images owned(images);
    state.finish(status);
    return owned;
  }

  /// Starts a job; `on_step` runs on the job's worker thread.
  Job submit(const Params& params, StepCallback on_step = {}) {
    auto state = std::make_unique<detail::StepState>();
    state->callback = std::move(on_step);
    sd_generate_params c = params.to_c();
    state->install(c);
    sd_job* job = nullptr;
    detail::check(sd_job_submit(pipeline_.get(), &c, &job));
    return Job(job, std::move(state));
  }

  /// What was loaded: family, native size, prediction type, channels, clip_skip range,
  /// default scheduler (valid while this Pipeline lives), dtype, device.
  sd_pipeline_info info() const {
    sd_pipeline_info i{};
    i.struct_size = sizeof i;
    detail::check(sd_pipeline_get_info(pipeline_.get(), &i));
    return i;
  }

  sd_pipeline* get() const { return pipeline_.get(); }

 private:
  struct Free {
    void operator()(sd_pipeline* p) const { sd_pipeline_free(p); }
  };
  // Declared before pipeline_, so destroyed after it.
  std::unique_ptr<detail::LogState> log_;
  std::vector<std::unique_ptr<detail::LogState>> retired_logs_;
  std::unique_ptr<sd_pipeline, Free> pipeline_;
};

/// True when the loaded library speaks this header's ABI.
inline bool abi_compatible() { return sd_abi_version() == SD_ABI_VERSION; }

}  // namespace sd

#endif  // STABLE_DIFFUSION_HPP
