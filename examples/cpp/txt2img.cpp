// The C ABI through the header-only RAII wrapper (include/stable_diffusion.hpp): exceptions for
// errors, lambdas for callbacks, destructors for cleanup. Exits non-zero when anything does not
// behave as documented, so the test suite runs it as a check.
//
//     c++ -std=c++17 txt2img.cpp $(pkg-config --cflags --libs stable_diffusion) -o txt2img
//     ./txt2img models/tiny out.ppm [LORA_MODEL LORA_FILE]
//
// With LORA_MODEL and LORA_FILE (a LoRA made for that model, e.g. tests/fixtures/tiny-sd1 and
// tests/fixtures/lora/sd1-kohya.safetensors) it also applies the LoRA per call.
#include "stable_diffusion.hpp"
#include <algorithm>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

void write_ppm(const std::string& path, const sd_image& img) {
  std::ofstream out(path, std::ios::binary);
  out << "P6\n" << img.width << " " << img.height << "\n255\n";
  for (uint32_t y = 0; y < img.height; ++y)
    for (uint32_t x = 0; x < img.width; ++x)
      out.write(reinterpret_cast<const char*>(img.data + y * img.stride + x * img.channels), 3);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string model = argc > 1 ? argv[1] : "models/tiny";
  const std::string out_path = argc > 2 ? argv[2] : "txt2img-cpp.ppm";
  if (!sd::abi_compatible()) {
    std::cerr << "header and library ABI differ\n";
    return 1;
  }

  // Errors are exceptions carrying the status code.
  try {
    sd::Pipeline missing("no/such/model");
    expect(false, "loading a missing model must throw");
  } catch (const sd::Error& e) {
    expect(e.status() == SD_ERR_IO, "missing model: SD_ERR_IO");
    std::cout << "expected failure: " << e.what() << "\n";
  }

  // The load options reach the library field by field: a kernel choice it does not know is
  // refused by name.
  try {
    sd::LoadOptions bad;
    bad.weights = static_cast<sd_weights>(7);
    sd::Pipeline refused(model, bad);
    expect(false, "an unknown weights value must throw");
  } catch (const sd::Error& e) {
    expect(e.status() == SD_ERR_INVALID_ARGUMENT &&
               std::string(e.what()).find("plain_weights is 7") != std::string::npos,
           "unknown weights value: SD_ERR_INVALID_ARGUMENT naming plain_weights");
  }

  sd::Pipeline pipe(model);
  // What was loaded: an engine sizes its UI from this.
  sd_pipeline_info info = pipe.info();
  std::cout << "family " << info.family << ", native " << info.native_width << "x"
            << info.native_height << ", scheduler " << info.default_scheduler << "\n";
  expect(info.family == SD_FAMILY_SD1 && info.unet_in_channels == 4 && info.native_width > 0 &&
             info.vae_scale_factor > 0 && info.native_width % info.vae_scale_factor == 0,
         "pipeline info");
  std::atomic<int> logs{0};
  pipe.set_logger([&](sd_log_level, const std::string& message) {
    ++logs;
    std::cerr << "[sd] " << message << "\n";
  });

  sd::Params params;
  params.prompt = "a red circle on a white background";
  params.steps = 4;
  params.seed = 42;
  params.width = params.height = 32;
  params.output_channels = 4;  // RGBA, as game engines like their textures

  unsigned steps_seen = 0;
  uint32_t preview_width = 0;
  sd::Images images = pipe.generate(params, [&](const sd::Step& s) {
    ++steps_seen;
    preview_width = s.preview(0).width;
    expect(!s.latents().empty(), "latents");
    return true;
  });
  expect(images.size() == 1, "one image");
  const sd_image& img = images[0];
  expect(img.width == 32 && img.height == 32 && img.channels == 4 && img.stride == 128,
         "32x32 RGBA");
  write_ppm(out_path, img);
  std::cout << "wrote " << out_path << "\n";
  expect(steps_seen == 4 && preview_width > 0, "four steps with previews");
  expect(logs > 0, "log messages");

  // Prompts as A1111 reads them: the same text with a weight and BREAK is another image.
  {
    sd::Params weighted = params;
    weighted.prompt = "a (red:1.4) circle BREAK on a [white] background";
    weighted.prompt_syntax = SD_PROMPT_A1111;
    sd::Images a1111 = pipe.generate(weighted);
    weighted.prompt_syntax = SD_PROMPT_PLAIN;
    sd::Images plain = pipe.generate(weighted);
    const sd_image &x = a1111[0], &y = plain[0];
    expect(x.width == y.width && x.height == y.height &&
               !std::equal(x.data, x.data + size_t(x.stride) * x.height, y.data),
           "A1111 syntax changes the image");
  }

  // A LoRA per call: read once, applied to the calls that ask for it, at any weight; the model
  // is never changed, so a call without it gives the image of before.
  if (argc > 4) {
    sd::Pipeline base(argv[3]);
    sd::Lora lora(argv[4]);
    sd::Params p;
    p.prompt = "a red circle";
    p.steps = 2;
    p.width = p.height = 32;
    sd::Images before = base.generate(p);
    sd::Params with = p;
    with.add_lora(lora, 0.8);
    sd::Images styled = base.generate(with);
    sd::Images after = base.generate(p);
    const sd_image &b = before[0], &s = styled[0], &a = after[0];
    const size_t bytes = size_t(b.stride) * b.height;
    expect(!std::equal(b.data, b.data + bytes, s.data), "the LoRA changes the image");
    expect(std::equal(b.data, b.data + bytes, a.data), "without it, the image of before");
    try {
      sd::Lora missing("no/such/lora.safetensors");
      expect(false, "a missing LoRA must throw");
    } catch (const sd::Error& e) {
      expect(e.status() == SD_ERR_IO, "missing LoRA: SD_ERR_IO");
    }
    std::cout << "LoRA: applied per call\n";
  }

  // An exception in the callback cancels the run and comes back out of generate().
  try {
    pipe.generate(params, [](const sd::Step&) -> bool { throw std::runtime_error("boom"); });
    expect(false, "the callback's exception must propagate");
  } catch (const std::runtime_error& e) {
    expect(std::string(e.what()) == "boom", "the callback's own exception");
  }

  // A job polled from a loop, and one cancelled from another thread.
  sd::Job job = pipe.submit(params);
  while (!job.wait(std::chrono::milliseconds(5))) {
    sd_job_progress p = job.progress();
    std::cerr << "\rjob step " << p.step << "/" << p.total;
  }
  std::cerr << "\n";
  expect(job.take_images().size() == 1, "job images");

  params.steps = 200;
  std::atomic<bool> started{false};
  sd::Job slow = pipe.submit(params, [&](const sd::Step&) {
    started = true;
    return true;
  });
  std::thread canceller([&] {
    while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    slow.cancel();
  });
  canceller.join();
  try {
    slow.wait();
    expect(false, "a cancelled job must throw");
  } catch (const sd::Error& e) {
    expect(e.status() == SD_ERR_CANCELLED, "SD_ERR_CANCELLED");
  }

  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "cpp example: ok\n";
  return 0;
}
