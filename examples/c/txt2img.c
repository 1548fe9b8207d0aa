/*
 * The C ABI from C: load a model without blocking (with progress, and a cancelled load), list
 * the schedulers and check the devices, generate with a progress callback and a preview, save
 * a PPM, run a job without blocking and show its previews from the game loop, cancel another,
 * and show how errors read. Exits non-zero when
 * anything does not behave as documented, so the test suite runs it as a check.
 *
 *     cc -std=c99 txt2img.c $(pkg-config --cflags --libs stable_diffusion) -o txt2img
 *     ./txt2img models/tiny out.ppm "a red circle" 4
 */
#define _POSIX_C_SOURCE 199309L /* nanosleep */
#include "stable_diffusion.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;

#define EXPECT(cond, ...)                                        \
  do {                                                           \
    if (!(cond)) {                                               \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);     \
      fprintf(stderr, __VA_ARGS__);                              \
      fprintf(stderr, " (last error: %s)\n", sd_last_error());   \
      failures++;                                                \
    }                                                            \
  } while (0)

static void on_log(sd_log_level level, const char *message, void *user_data) {
  static const char *names[] = {"debug", "info", "warn", "error"};
  int *count = (int *)user_data;
  (*count)++;
  fprintf(stderr, "[sd %s] %s\n", (level >= 0 && level <= 3) ? names[level] : "?", message);
}

struct progress {
  unsigned calls;
  unsigned preview_width;
  unsigned cancel_at; /* 0: never */
};

static int32_t on_step(const sd_step_info *info, void *user_data) {
  struct progress *p = (struct progress *)user_data;
  p->calls++;
  fprintf(stderr, "\rstep %u/%u (t=%.0f, %.2fs)", info->step, info->total, info->timestep,
          info->elapsed_seconds);
  if (info->step == 1) {
    const sd_image *preview = NULL;
    if (sd_step_preview(info, 0, &preview) == SD_OK) p->preview_width = preview->width;
  }
  if (info->step == info->total) fputc('\n', stderr);
  return (p->cancel_at && info->step == p->cancel_at) ? SD_STEP_CANCEL : SD_STEP_CONTINUE;
}

struct load_seen {
  unsigned calls;
  uint64_t last_bytes;
  unsigned cancel_at; /* 0: never */
};

static int32_t on_load(const sd_load_progress *p, void *user_data) {
  struct load_seen *seen = (struct load_seen *)user_data;
  seen->calls++;
  seen->last_bytes = p->bytes_done;
  return (seen->cancel_at && seen->calls >= seen->cancel_at) ? SD_STEP_CANCEL : SD_STEP_CONTINUE;
}

static int write_ppm(const char *path, const sd_image *img) {
  FILE *f = fopen(path, "wb");
  uint32_t y, x;
  if (!f) return 0;
  fprintf(f, "P6\n%u %u\n255\n", img->width, img->height);
  for (y = 0; y < img->height; y++) {
    const uint8_t *row = img->data + (size_t)y * img->stride;
    for (x = 0; x < img->width; x++) fwrite(row + (size_t)x * img->channels, 1, 3, f);
  }
  return fclose(f) == 0;
}

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : "models/tiny";
  const char *out_path = argc > 2 ? argv[2] : "txt2img.ppm";
  const char *prompt = argc > 3 ? argv[3] : "a red circle on a white background";
  unsigned steps = argc > 4 ? (unsigned)atoi(argv[4]) : 4;
  sd_pipeline *pipe = NULL;
  sd_images *images = NULL;
  sd_generate_params params;
  struct progress progress = {0, 0, 0};
  int logs = 0;
  sd_status status;

  printf("libstable_diffusion %s, ABI %u\n", sd_version(), sd_abi_version());
  if (sd_abi_version() != SD_ABI_VERSION) {
    fprintf(stderr, "header ABI %d does not match the library's\n", SD_ABI_VERSION);
    return 1;
  }

  /* Errors are codes plus a message on this thread. */
  status = sd_pipeline_load("no/such/model", NULL, &pipe);
  EXPECT(status == SD_ERR_IO && pipe == NULL, "missing model gave %d", status);
  printf("expected failure: %s: %s\n", sd_status_string(status), sd_last_error());

  /* A model packed in an engine's archive loads from memory; bytes that are not one are
   * refused by name. */
  {
    static const char junk[] = "these bytes are not a checkpoint";
    sd_pipeline *none = NULL;
    status = sd_pipeline_load_from_memory(junk, sizeof junk, "assets.pak/model", NULL, &none);
    EXPECT(status == SD_ERR_BAD_MODEL && none == NULL && strstr(sd_last_error(), "assets.pak"),
           "junk from memory gave %d", status);
  }

  /* What the library offers before any load. */
  {
    size_t i, n = sd_scheduler_count();
    EXPECT(n > 0, "no schedulers");
    printf("schedulers:");
    for (i = 0; i < n; i++) printf(" %s", sd_scheduler_name(i, 0));
    printf("\n");
    EXPECT(sd_scheduler_name(n, 0) == NULL, "a name past the end");
    EXPECT(sd_device_check("cpu") == SD_OK, "cpu");
    EXPECT(sd_device_check("tpu") == SD_ERR_INVALID_ARGUMENT, "tpu");
    printf("CUDA devices: %d\n", sd_cuda_device_count());
  }

  /* A load on a worker thread, polled as a game loop would; one cancelled from its progress
   * callback first. */
  {
    sd_load_options options;
    sd_load_job *load = NULL;
    sd_load_progress lp;
    struct load_seen seen = {0, 0, 2};
    int frames = 0;
    sd_load_options_init(&options, sizeof options);
    options.on_progress = on_load;
    options.progress_user_data = &seen;
    options.log_fn = on_log;
    options.log_user_data = &logs;
    options.num_threads = 2;
    EXPECT(sd_pipeline_load_async(model, &options, &load) == SD_OK, "load async");
    status = sd_load_job_wait(load, -1);
    EXPECT(status == SD_ERR_CANCELLED && seen.calls == 2, "cancelled load gave %d after %u", status,
           seen.calls);
    EXPECT(sd_load_job_take_pipeline(load, &pipe) == SD_ERR_CANCELLED && pipe == NULL, "taken");
    sd_load_job_free(load);

    seen.calls = 0;
    seen.cancel_at = 0;
    load = NULL;
    EXPECT(sd_pipeline_load_async(model, &options, &load) == SD_OK, "load async");
    memset(&lp, 0, sizeof lp);
    lp.struct_size = sizeof lp;
    for (;;) {
      sd_load_job_poll(load, &lp);
      if (lp.state != SD_JOB_QUEUED && lp.state != SD_JOB_RUNNING) break;
      frames++;
      sleep_ms(1);
    }
    printf("load: %s, %llu of %llu bytes, %d frames, %u reports\n", lp.component,
           (unsigned long long)lp.bytes_done, (unsigned long long)lp.bytes_total, frames,
           seen.calls);
    EXPECT(lp.state == SD_JOB_SUCCEEDED, "load state %d", lp.state);
    EXPECT(lp.bytes_total > 0 && seen.last_bytes == lp.bytes_done, "load bytes");
    status = sd_load_job_take_pipeline(load, &pipe);
    sd_load_job_free(load);
    if (status != SD_OK) {
      fprintf(stderr, "cannot load %s: %s\n", model, sd_last_error());
      return 1;
    }
  }
  sd_pipeline_set_log_callback(pipe, on_log, &logs);

  sd_generate_params_init(&params, sizeof params);
  params.width = 17; /* not a multiple of 8, and no prompt */
  status = sd_generate(pipe, &params, &images);
  EXPECT(status == SD_ERR_INVALID_ARGUMENT && images == NULL, "bad params gave %d", status);
  printf("expected failure: %s: %s\n", sd_status_string(status), sd_last_error());

  /* Text to image with a progress callback. */
  params.prompt = prompt;
  params.negative_prompt = "blurry";
  params.steps = steps;
  params.seed = 42;
  params.width = 32;
  params.height = 32;
  params.on_step = on_step;
  params.step_user_data = &progress;
  status = sd_generate(pipe, &params, &images);
  EXPECT(status == SD_OK, "generate gave %d", status);
  if (status == SD_OK) {
    size_t count = 0;
    const sd_image *img = NULL;
    sd_images_count(images, &count);
    EXPECT(count == 1, "%zu images", count);
    EXPECT(sd_images_get(images, 0, &img) == SD_OK, "sd_images_get");
    EXPECT(img->width == 32 && img->height == 32 && img->channels == 3 && img->stride == 96,
           "image %ux%u", img->width, img->height);
    EXPECT(write_ppm(out_path, img), "cannot write %s", out_path);
    printf("wrote %s (%ux%u)\n", out_path, img->width, img->height);
    sd_images_free(images);
    images = NULL;
  }
  EXPECT(progress.calls == steps, "callback ran %u times for %u steps", progress.calls, steps);
  EXPECT(progress.preview_width > 0, "no preview");
  EXPECT(logs > 0, "no log message");

  /* The callback cancels. */
  progress.calls = 0;
  progress.cancel_at = 1;
  status = sd_generate(pipe, &params, &images);
  EXPECT(status == SD_ERR_CANCELLED && images == NULL && progress.calls == 1,
         "cancel gave %d after %u calls", status, progress.calls);

  /* A job, polled as a game loop would, then one cancelled from here. */
  {
    sd_job *job = NULL;
    sd_job_progress p;
    int frames = 0;
    unsigned previews = 0;
    params.on_step = NULL;
    params.job_preview_every = 1;
    EXPECT(sd_job_submit(pipe, &params, &job) == SD_OK, "submit");
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    for (;;) {
      uint32_t step = 0;
      sd_images *preview = NULL;
      sd_job_poll(job, &p);
      if (sd_job_take_preview(job, &step, &preview) == SD_OK) {
        previews++; /* show it */
        sd_images_free(preview);
      }
      if (p.state != SD_JOB_QUEUED && p.state != SD_JOB_RUNNING) break;
      frames++;
      sleep_ms(2); /* render a frame */
    }
    EXPECT(previews > 0, "no preview from the game loop");
    params.job_preview_every = 0;
    printf("job: state %d after %d frames, %u/%u steps\n", p.state, frames, p.step, p.total);
    EXPECT(p.state == SD_JOB_SUCCEEDED, "job state %d", p.state);
    EXPECT(sd_job_take_images(job, &images) == SD_OK, "take");
    sd_images_free(images);
    images = NULL;
    sd_job_free(job);

    job = NULL;
    params.steps = 200;
    EXPECT(sd_job_submit(pipe, &params, &job) == SD_OK, "submit");
    EXPECT(sd_job_cancel(job) == SD_OK, "cancel");
    status = sd_job_wait(job, -1);
    EXPECT(status == SD_ERR_CANCELLED, "cancelled job gave %d", status);
    sd_job_free(job);
  }

  sd_pipeline_free(pipe);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("c example: ok\n");
  return 0;
}
