/*
 * Fuzzes the generation parameters and images through the C ABI from a fixed seed, and checks
 * the header's promises on every case:
 *  - no crash (and, under valgrind, no memory error: every input buffer is allocated to its
 *    exact size, so a read past its end is caught);
 *  - out-pointers preset to a non-NULL sentinel come back NULL (or 0) when a call fails;
 *  - a failure comes with a non-empty message;
 *  - sd_job_submit refuses at once exactly what sd_generate refuses, with the same status and
 *    message; a job it accepts ends as the generate call ended.
 * Valid cases run at most one step (the step callback cancels; most of their jobs are
 * cancelled at once), and the callback itself fuzzes sd_step_preview / sd_step_latents.
 *
 *     cc -std=c99 abi_fuzz.c $(pkg-config --cflags --libs stable_diffusion) -o abi_fuzz
 *     ./abi_fuzz models/tiny 3000          # a few thousand cases
 *     ./abi_fuzz models/tiny 300 --light   # only cases that fail validation, plus one tiny
 *                                          # real job (for valgrind)
 * Prints how many cases ran and exits non-zero on any broken promise.
 */
#include "stable_diffusion.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      if (failures < 50) {                                            \
        fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);        \
        fprintf(stderr, __VA_ARGS__);                                 \
        fputc('\n', stderr);                                          \
      }                                                               \
      failures++;                                                     \
    }                                                                 \
  } while (0)

/* xorshift64*: the same cases on every run. */
static uint64_t rng_state = 0x5eed0abf022ull;

static uint64_t rnd(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1Dull;
}

static size_t below(size_t n) { return (size_t)(rnd() % n); }

static int chance(unsigned percent) { return below(100) < percent; }

#define PICK(array) ((array)[below(sizeof(array) / sizeof((array)[0]))])

/* What a failing call left: a copy of its message. */
static char *copy_error(void) {
  const char *e = sd_last_error();
  size_t n = strlen(e);
  char *c = (char *)malloc(n + 1);
  if (c) memcpy(c, e, n + 1);
  return c;
}

static int has_message(void) { return sd_last_error()[0] != '\0'; }

/* ---------------------------------------------------------------------------------------- */
/* images */

struct owned_image {
  sd_image image;
  uint8_t *pixels; /* exactly the bytes the image describes */
};

/* A random input image: a valid one (any size up to 64 x 64, 1, 3 or 4 channels, packed or
 * padded rows), or one with at least one defect. Buffers are sized exactly, so valgrind sees
 * any read past their end. */
static void random_image(struct owned_image *o, int good) {
  static const uint32_t good_channels[] = {1, 3, 4};
  static const uint32_t bad_channels[] = {0, 2, 5, 6, 255, 0xFFFFFFFFu};
  static const uint32_t bad_sides[] = {0, 16385, 100000, 0xFFFFFFFFu};
  uint32_t w = 1 + (uint32_t)below(64), h = 1 + (uint32_t)below(64);
  uint32_t c = PICK(good_channels);
  uint32_t stride = chance(40) ? w * c + (uint32_t)below(17) : 0;
  int null_data = 0;
  size_t bytes = 0;
  free(o->pixels); /* a slot may be filled twice in one case */
  memset(o, 0, sizeof *o);
  if (chance(10)) w = 4097 + (uint32_t)below(2000); /* valid input, too big an output */
  if (chance(10)) w = 1 + (uint32_t)below(7);       /* valid input, rounds to 0 */
  if (!good) {
    switch (below(5)) {
      case 0: c = PICK(bad_channels); break;
      case 1: w = PICK(bad_sides); break;
      case 2: h = PICK(bad_sides); break;
      case 3: /* rows shorter than width * channels (0 would mean packed) */
        if (w * c > 1) {
          stride = 1 + (uint32_t)below(w * c - 1);
        } else {
          null_data = 1;
        }
        break;
      default: null_data = 1; break;
    }
  }
  o->image.width = w;
  o->image.height = h;
  o->image.channels = c;
  o->image.stride = stride;
  /* Allocate what an image of this shape covers, for the shapes the library may read (it
   * refuses the others before reading). */
  if (w >= 1 && h >= 1 && w <= 8000 && h <= 64 && c >= 1 && c <= 4) {
    size_t row = (size_t)w * c;
    size_t s = stride ? stride : row;
    if (s >= row) bytes = s * (h - 1) + row;
  }
  if (bytes && !null_data) {
    size_t i;
    o->pixels = (uint8_t *)malloc(bytes);
    if (o->pixels)
      for (i = 0; i < bytes; i++) o->pixels[i] = (uint8_t)rnd();
  }
  o->image.data = o->pixels; /* NULL when none: an error case of its own */
}

/* ---------------------------------------------------------------------------------------- */
/* the step callback: cancels at the first step, fuzzing the step accessors first */

struct step_record {
  unsigned calls;
  long broken; /* broken promises seen inside the callback */
};

static int32_t on_step(const sd_step_info *info, void *user_data) {
  struct step_record *r = (struct step_record *)user_data;
  const sd_image *img = (const sd_image *)(uintptr_t)1;
  uint32_t bad = info->batch + (uint32_t)below(3);
  float one = 0.0f;
  r->calls++;
  if (sd_step_preview(info, bad, &img) == SD_OK || img != NULL || !has_message()) r->broken++;
  img = (const sd_image *)(uintptr_t)1;
  if (sd_step_preview(info, 0, &img) == SD_OK) {
    if (img == NULL || img->width != info->latent_width) r->broken++;
  } else if (img != NULL) {
    r->broken++;
  }
  if (sd_step_latents(info, NULL, 4) == SD_OK) r->broken++;
  if (sd_step_latents(info, &one, 1) == SD_OK) r->broken++; /* always too small */
  return SD_STEP_CANCEL;
}

/* ---------------------------------------------------------------------------------------- */
/* parameters */

/* Params with room behind them, so that a struct_size past ours reads zeroed (or not) bytes. */
struct big_params {
  sd_generate_params p;
  unsigned char tail[32];
};

static const char *const bad_utf8 = "\xc3\x28 broken";
static sd_pipeline *fuzz_pipe;     /* the pipeline every case runs on */
static sd_pipeline *fuzz_refiner;  /* a second pipeline, for params->refiner */
static char *long_prompt;   /* 65537 bytes: over the limit */
static char *limit_prompt;  /* 65536 bytes of words: at the limit */
static char *long_name;     /* a 10 KB scheduler name */

static const char *scheduler_name(int good) {
  static const char *const good_names[] = {"ddim", "DDIMScheduler", "euler", "euler_a",
                                           "Euler a", "dpm++ 2m", "pndm", "lms", "heun",
                                           "unipc", "ddpm", "", NULL};
  static const char *const bad_names[] = {"NoSuchScheduler", "eulerx", "DDIM Scheduler",
                                          "k_euler_z", "ddim\x01", "dpm+++", " "};
  if (good) return PICK(good_names);
  switch (below(4)) {
    case 0: return bad_utf8;
    case 1: return long_name;
    default: return PICK(bad_names);
  }
}

/* One field changed to a good (valid) or a bad value; returns its name. */
static const char *mutate(struct big_params *b, struct owned_image *images, int good) {
  sd_generate_params *g = &b->p;
  static const uint32_t good_sides[] = {0, 16, 24, 32, 40};
  static const uint32_t bad_sides[] = {7, 12, 33, 4100, 4104, 8192, 0xFFFFFFFFu, 0xFFFFFFF8u};
  static const uint32_t good_steps[] = {1, 2, 50, 999};
  static const uint32_t bad_steps[] = {0, 1001, 5000, 0xFFFFFFFFu};
  static const uint32_t good_batch[] = {1, 2};
  static const uint32_t bad_batch[] = {0, 65, 1000, 0xFFFFFFFFu};
  static const uint32_t good_skip[] = {0, 1, 3};
  static const uint32_t bad_skip[] = {4, 5, 1000, 0xFFFFFFFFu};
  static const uint32_t good_channels[] = {3, 4};
  static const uint32_t bad_channels[] = {0, 1, 2, 5, 0xFFFFFFFFu};
  static const double good_guidance[] = {7.5, 0.0, 1.0, -3.0, 1e6};
  static const double good_strength[] = {-1.0, 0.0, 0.3, 1.0, 1e-300, -1e300};
  static const double good_eta[] = {0.0, 0.5, 1.0};
  const double bad_doubles[] = {NAN, INFINITY, -INFINITY};
  const double bad_strength[] = {NAN, INFINITY, -INFINITY, 1.5, 1.0000001, 2.0, 1e300};
  const double bad_eta[] = {NAN, INFINITY, -INFINITY, -1.0, -1e-9};
  static const size_t bad_sizes[] = {0, 8, 100, 1u << 20, (size_t)-1};
  static const uint32_t good_interval[] = {0, 1, 2, 3, 1000};
  static const uint32_t bad_interval[] = {1001, 0xFFFFFFFFu};
  static const uint32_t good_branch[] = {0, 1, 2};
  static const uint32_t bad_branch[] = {1000, 0xFFFFFFFFu};
  static const double good_merging[] = {0.0, 0.25, 0.5, 0.75};
  const double bad_merging[] = {NAN, INFINITY, -INFINITY, -0.1, 0.76, 1e300};
  static const uint32_t good_micro[] = {1, 8, 512, 1024, 4096, 1u << 20};
  static const uint32_t bad_micro[] = {(1u << 20) + 1, 0x7FFFFFFFu, 0xFFFFFFFFu};
  static const double good_rescale[] = {0.0, 0.3, 0.7, 1.0};
  const double bad_rescale[] = {NAN, INFINITY, -INFINITY, -0.1, 1.01, 1e300};
  static const double good_score[] = {6.0, 2.5, 0.0, -3.0, 10.0};
  const double bad_score[] = {NAN, INFINITY, -INFINITY, 1e300, -1e7};
  static const double good_start[] = {0.5, 0.8, 1e-9, 0.999999};
  const double bad_start[] = {NAN, INFINITY, -INFINITY, 0.0, 1.0, -0.5, 1.5};
  switch (below(25)) {
    case 0:
      g->width = good ? PICK(good_sides) : PICK(bad_sides);
      return "width";
    case 1:
      g->height = good ? PICK(good_sides) : PICK(bad_sides);
      return "height";
    case 2:
      g->steps = good ? PICK(good_steps) : PICK(bad_steps);
      return "steps";
    case 3:
      g->batch = good ? PICK(good_batch) : PICK(bad_batch);
      return "batch";
    case 4:
      g->guidance = good ? PICK(good_guidance) : PICK(bad_doubles);
      return "guidance";
    case 5:
      g->strength = good ? PICK(good_strength) : PICK(bad_strength);
      return "strength";
    case 6:
      g->eta = good ? PICK(good_eta) : PICK(bad_eta);
      return "eta";
    case 7:
      g->clip_skip = good ? PICK(good_skip) : PICK(bad_skip);
      return "clip_skip";
    case 8:
      g->output_channels = good ? PICK(good_channels) : PICK(bad_channels);
      return "output_channels";
    case 9:
      g->scheduler = scheduler_name(good);
      return "scheduler";
    case 10:
      if (good) {
        g->prompt = chance(20) ? limit_prompt : (chance(50) ? "" : "a blue square");
      } else {
        g->prompt = chance(30) ? NULL : (chance(50) ? bad_utf8 : long_prompt);
      }
      return "prompt";
    case 11:
      if (good) {
        g->negative_prompt = chance(50) ? NULL : "blurry";
      } else {
        g->negative_prompt = chance(50) ? bad_utf8 : long_prompt;
      }
      return "negative_prompt";
    case 12:
      if (good) {
        b->p.struct_size = sizeof(sd_generate_params) + (chance(50) ? 0 : 8 + below(25));
      } else if (chance(30)) {
        /* A newer caller's struct that sets a field this library does not know. */
        size_t extra = 1 + below(sizeof b->tail);
        b->p.struct_size = sizeof(sd_generate_params) + extra;
        b->tail[below(extra)] = (unsigned char)(1 + below(255));
      } else {
        b->p.struct_size = PICK(bad_sizes);
      }
      return "struct_size";
    case 13:
      random_image(&images[0], good);
      g->init_image = &images[0].image;
      if (chance(50)) g->width = g->height = 0; /* size from the image */
      return "init_image";
    case 14:
      random_image(&images[1], good);
      g->mask = &images[1].image;
      return "mask";
    case 15:
      g->token_merging = good ? PICK(good_merging) : PICK(bad_merging);
      return "token_merging";
    case 16:
      g->int8_linear = (int32_t)(rnd() % 3) - 1; /* any value is valid: non-zero is on */
      if (good) {
        g->cache_interval = PICK(good_interval);
        g->cache_branch = PICK(good_branch);
      } else if (chance(50)) {
        g->cache_interval = 2;
        g->cache_branch = PICK(bad_branch);
      } else {
        g->cache_interval = PICK(bad_interval);
      }
      return "step cache";
    case 17:
      /* SDXL's second prompts; models with one text encoder check and ignore them. */
      if (good) {
        g->prompt_2 = chance(50) ? NULL : "a green triangle";
        g->negative_prompt_2 = chance(50) ? NULL : "";
      } else if (chance(50)) {
        g->prompt_2 = chance(50) ? bad_utf8 : long_prompt;
      } else {
        g->negative_prompt_2 = chance(50) ? bad_utf8 : long_prompt;
      }
      return "prompt_2";
    case 18:
      /* SDXL micro-conditioning: sizes are both 0 or both set, every value at most 2^20. */
      if (good) {
        g->original_width = PICK(good_micro);
        g->original_height = PICK(good_micro);
        g->crop_left = chance(50) ? 0 : PICK(good_micro);
        g->target_width = g->target_height = 0;
      } else if (chance(50)) {
        g->target_width = PICK(good_micro);
        g->target_height = 0;
      } else {
        g->crop_top = PICK(bad_micro);
      }
      return "micro-conditioning";
    case 19:
      g->guidance_rescale = good ? PICK(good_rescale) : PICK(bad_rescale);
      return "guidance_rescale";
    case 20:
      /* The SDXL refiner's aesthetic scores: any finite value up to 2^20 in size. */
      if (chance(50)) {
        g->aesthetic_score = good ? PICK(good_score) : PICK(bad_score);
      } else {
        g->negative_aesthetic_score = good ? PICK(good_score) : PICK(bad_score);
      }
      return "aesthetic_score";
    case 21:
      /* A refiner: another pipeline with a start strictly inside (0, 1); NULL ignores the
         start; the pipeline itself is refused. */
      if (good) {
        g->refiner = chance(50) ? NULL : fuzz_refiner;
        g->refiner_start = chance(50) ? PICK(good_start) : PICK(bad_start);
        if (g->refiner) g->refiner_start = PICK(good_start);
      } else if (chance(30)) {
        g->refiner = fuzz_pipe;
      } else {
        g->refiner = fuzz_refiner;
        g->refiner_start = PICK(bad_start);
      }
      return "refiner";
    case 22:
      /* How the prompt is read: plain or A1111 (with its syntax in the prompt, long ones
         included); any other value is refused. */
      if (good) {
        g->prompt_syntax = chance(50) ? SD_PROMPT_PLAIN : SD_PROMPT_A1111;
        if (chance(50)) g->prompt = "a (blue:1.3) square BREAK [[on]] ((a) \\(grey\\) field";
      } else {
        static const int32_t bad_syntax[] = {2, -1, 7, INT32_MAX, INT32_MIN};
        g->prompt_syntax = PICK(bad_syntax);
      }
      return "prompt_syntax";
    case 23: {
      /* Per-call LoRAs: none (NULL or an empty array); a NULL array with a count, a count
         over the limit, or an entry whose handle is not a live sd_lora are refused. */
      static const uint64_t not_a_handle[4] = {0};
      static sd_lora_weight entries[2];
      entries[0].lora = (const sd_lora *)not_a_handle;
      entries[0].weight = 1.0;
      entries[1].lora = NULL;
      entries[1].weight = 0.5;
      if (good) {
        g->loras = chance(50) ? NULL : entries;
        g->lora_count = 0;
      } else {
        switch (below(4)) {
          case 0: g->loras = NULL; g->lora_count = 1 + below(3); break;
          case 1: g->loras = entries; g->lora_count = 65 + below(1000); break;
          case 2: g->loras = &entries[0]; g->lora_count = 1; break;
          default: g->loras = &entries[1]; g->lora_count = 1; break;
        }
      }
      return "loras";
    }
    default:
      random_image(&images[0], good || chance(50));
      random_image(&images[1], good || chance(50));
      g->init_image = &images[0].image;
      g->mask = &images[1].image;
      return "inpainting";
  }
}

/* A mutation that no other field can make valid, applied last in light mode. */
static const char *certainly_bad(struct big_params *b) {
  sd_generate_params *g = &b->p;
  switch (below(6)) {
    case 0: g->width = 33; return "width 33";
    case 1: g->steps = 0; return "steps 0";
    case 2: g->guidance = NAN; return "guidance NaN";
    case 3: g->scheduler = "NoSuchScheduler"; return "scheduler";
    case 4: g->prompt = long_prompt; return "long prompt";
    default: g->batch = 0; return "batch 0";
  }
}

/* ---------------------------------------------------------------------------------------- */

struct counts {
  long cases, refused, accepted, accessor_checks;
};

/* Both calls on the same parameters; every promise checked. */
static void run_case(sd_pipeline *pipe, struct big_params *b, const char *what, long n,
                     struct counts *counts) {
  struct step_record gen_steps = {0, 0}, job_steps = {0, 0};
  sd_images *images = (sd_images *)(uintptr_t)1;
  sd_job *job = (sd_job *)(uintptr_t)1;
  sd_status gen, sub;
  char *gen_message = NULL;
  struct big_params for_job = *b;

  b->p.on_step = on_step;
  b->p.step_user_data = &gen_steps;
  for_job.p.on_step = on_step;
  for_job.p.step_user_data = &job_steps;

  gen = sd_generate(pipe, &b->p, &images);
  if (gen != SD_OK) {
    CHECK(images == NULL, "case %ld (%s): sd_generate left out_images set", n, what);
    CHECK(has_message(), "case %ld (%s): sd_generate failed without a message", n, what);
    gen_message = copy_error();
  } else {
    size_t count = 0;
    const sd_image *img = (const sd_image *)(uintptr_t)1;
    CHECK(images != NULL, "case %ld (%s): SD_OK without images", n, what);
    CHECK(sd_images_count(images, &count) == SD_OK && count == b->p.batch,
          "case %ld (%s): %zu images for batch %u", n, what, count, b->p.batch);
    CHECK(sd_images_get(images, count, &img) != SD_OK && img == NULL,
          "case %ld (%s): sd_images_get past the end", n, what);
    if (sd_images_get(images, 0, &img) == SD_OK) {
      CHECK(img->channels == b->p.output_channels && img->stride == img->width * img->channels,
            "case %ld (%s): image layout", n, what);
    }
    sd_images_free(images);
  }
  CHECK(gen_steps.broken == 0, "case %ld (%s): step accessors broke a promise", n, what);
  CHECK(gen_steps.calls <= 1, "case %ld (%s): ran past the cancel", n, what);

  sub = sd_job_submit(pipe, &for_job.p, &job);
  if (sub != SD_OK) {
    CHECK(job == NULL, "case %ld (%s): sd_job_submit left out_job set", n, what);
    CHECK(sub == gen, "case %ld (%s): submit gave %d, generate %d", n, what, sub, gen);
    CHECK(gen_message && strcmp(gen_message, sd_last_error()) == 0,
          "case %ld (%s): messages differ:\n  generate: %.300s\n  submit:   %.300s", n, what,
          gen_message ? gen_message : "(none)", sd_last_error());
    counts->refused++;
  } else {
    /* Most accepted jobs are cancelled at once (cheap); every eighth runs to its callback's
     * cancel at the first step, as the generate call did. */
    int run_it = counts->accepted % 8 == 0;
    sd_status waited, took;
    sd_images *taken = (sd_images *)(uintptr_t)1;
    if (!run_it) sd_job_cancel(job);
    waited = sd_job_wait(job, -1);
    took = sd_job_take_images(job, &taken);
    /* Only failures found while running may reach the job, and the same as generate's. */
    CHECK(gen != SD_ERR_INVALID_ARGUMENT && gen != SD_ERR_UNSUPPORTED,
          "case %ld (%s): submit accepted what generate refused: %s", n, what,
          gen_message ? gen_message : "");
    CHECK(waited == gen || (!run_it && waited == SD_ERR_CANCELLED),
          "case %ld (%s): job ended with %d, generate with %d", n, what, waited, gen);
    CHECK(took == waited, "case %ld (%s): take gave %d, wait %d", n, what, took, waited);
    if (took == SD_OK) {
      sd_images_free(taken);
    } else {
      CHECK(taken == NULL, "case %ld (%s): take left out_images set", n, what);
    }
    CHECK(job_steps.broken == 0, "case %ld (%s): step accessors broke a promise in a job", n,
          what);
    sd_job_free(job);
    counts->accepted++;
  }
  free(gen_message);
  counts->cases++;
}

/* NULL and junk handles and out-pointers through every other entry point. */
static void accessor_checks(sd_pipeline *pipe, struct counts *counts) {
  uint64_t junk[16];
  const sd_generate_params *null_params = NULL;
  sd_generate_params ok;
  sd_step_info stale;
  sd_job_progress progress;
  size_t count = 777;
  const sd_image *img = (const sd_image *)(uintptr_t)1;
  sd_images *images = (sd_images *)(uintptr_t)1;
  sd_job *job = (sd_job *)(uintptr_t)1;
  sd_pipeline *loaded = (sd_pipeline *)(uintptr_t)1;
  sd_load_options options;
  void *handle = chance(50) ? NULL : (void *)junk;
  memset(junk, 0, sizeof junk);
  memset(&stale, 0, sizeof stale);
  sd_generate_params_init(&ok, sizeof ok);
  ok.prompt = "a red circle";

  CHECK(sd_images_count((const sd_images *)handle, &count) != SD_OK && count == 0 &&
            has_message(),
        "sd_images_count on a bad handle");
  CHECK(sd_images_get((const sd_images *)handle, below(4), &img) != SD_OK && img == NULL,
        "sd_images_get on a bad handle");
  CHECK(sd_images_count(NULL, NULL) != SD_OK && sd_images_get(NULL, 0, NULL) != SD_OK,
        "NULL out-pointers are errors");
  CHECK(sd_job_take_images((sd_job *)handle, &images) != SD_OK && images == NULL,
        "sd_job_take_images on a bad handle");
  CHECK(sd_job_take_images((sd_job *)handle, NULL) != SD_OK, "NULL out_images");
  memset(&progress, 0xAB, sizeof progress);
  progress.struct_size = sizeof progress;
  CHECK(sd_job_poll((const sd_job *)handle, &progress) != SD_OK && progress.step == 0 &&
            progress.total == 0 && progress.state == SD_JOB_QUEUED &&
            progress.elapsed_seconds == 0.0,
        "sd_job_poll on a bad handle leaves the progress zeroed");
  progress.struct_size = below(16); /* too small: not written */
  progress.step = 5;
  CHECK(sd_job_poll((const sd_job *)handle, &progress) != SD_OK && progress.step == 5,
        "sd_job_poll with a bad struct_size");
  CHECK(sd_job_cancel((sd_job *)handle) != SD_OK && sd_job_wait((sd_job *)handle, 0) != SD_OK,
        "cancel and wait on a bad handle");
  img = (const sd_image *)(uintptr_t)1;
  CHECK(sd_step_preview(chance(50) ? NULL : &stale, (uint32_t)below(3), &img) != SD_OK &&
            img == NULL,
        "sd_step_preview outside a callback");
  CHECK(sd_step_latents(&stale, NULL, 0) != SD_OK, "sd_step_latents outside a callback");
  CHECK(sd_generate((sd_pipeline *)handle, &ok, &images) != SD_OK && images == NULL,
        "sd_generate on a bad pipeline");
  CHECK(sd_job_submit((sd_pipeline *)handle, &ok, &job) != SD_OK && job == NULL,
        "sd_job_submit on a bad pipeline");
  images = (sd_images *)(uintptr_t)1;
  job = (sd_job *)(uintptr_t)1;
  CHECK(sd_generate(pipe, null_params, &images) != SD_OK && images == NULL,
        "sd_generate with NULL params");
  CHECK(sd_job_submit(pipe, null_params, &job) != SD_OK && job == NULL,
        "sd_job_submit with NULL params");
  CHECK(sd_generate(pipe, &ok, NULL) == SD_ERR_INVALID_ARGUMENT &&
            sd_job_submit(pipe, &ok, NULL) == SD_ERR_INVALID_ARGUMENT,
        "NULL out-pointers of generate and submit");
  CHECK(sd_pipeline_set_log_callback((sd_pipeline *)handle, NULL, NULL) != SD_OK,
        "log callback on a bad pipeline");
  /* Loads that fail before reading any weights. */
  sd_load_options_init(&options, sizeof options);
  switch (below(5)) {
    case 0: options.dtype = 3 + (int32_t)below(100); break;
    case 1: options.device = chance(50) ? "tpu" : bad_utf8; break;
    case 2: options.struct_size = below(16); break;
    default: break;
  }
  CHECK(sd_pipeline_load(chance(50) ? NULL : "no/such/model", &options, &loaded) != SD_OK &&
            loaded == NULL && has_message(),
        "sd_pipeline_load failing");
  CHECK(sd_load_options_init(NULL, sizeof options) != SD_OK &&
            sd_generate_params_init(&ok, below(8)) != SD_OK,
        "init functions refuse NULL and tiny sizes");
  sd_images_free(NULL);
  sd_job_free(NULL);
  sd_pipeline_free(NULL);
  counts->accessor_checks += 20;
}

/* Real tiny runs (one step, no guidance) that succeed: a job, and (unless light) a generate
 * call. Light mode (valgrind) keeps to the job: it covers the worker thread too. */
static void real_runs(sd_pipeline *pipe, int light) {
  sd_generate_params g;
  sd_images *images = NULL;
  sd_job *job = NULL;
  size_t count = 0;
  sd_generate_params_init(&g, sizeof g);
  g.prompt = "a red circle";
  g.steps = 1;
  g.guidance = 1.0;
  g.width = g.height = 16;
  if (!light) {
    CHECK(sd_generate(pipe, &g, &images) == SD_OK, "a real run: %s", sd_last_error());
    CHECK(sd_images_count(images, &count) == SD_OK && count == 1, "one image");
    sd_images_free(images);
    images = NULL;
  }
  CHECK(sd_job_submit(pipe, &g, &job) == SD_OK, "a real job: %s", sd_last_error());
  CHECK(sd_job_wait(job, -1) == SD_OK, "the job: %s", sd_last_error());
  CHECK(sd_job_take_images(job, &images) == SD_OK && images != NULL, "its images");
  CHECK(sd_images_count(images, &count) == SD_OK && count == 1, "one image");
  sd_images_free(images);
  sd_job_free(job);
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : "models/tiny";
  long cases = argc > 2 ? atol(argv[2]) : 3000;
  int light = argc > 3 && strcmp(argv[3], "--light") == 0;
  sd_pipeline *pipe = NULL;
  struct counts counts = {0, 0, 0, 0};
  long n;
  size_t i;

  if (sd_abi_version() != SD_ABI_VERSION) {
    fprintf(stderr, "header ABI %d does not match the library's\n", SD_ABI_VERSION);
    return 1;
  }
  long_prompt = (char *)malloc(65537 + 1);
  limit_prompt = (char *)malloc(65536 + 1);
  long_name = (char *)malloc(10000 + 1);
  if (!long_prompt || !limit_prompt || !long_name) return 1;
  memset(long_prompt, 'x', 65537);
  long_prompt[65537] = '\0';
  for (i = 0; i < 65536; i++) limit_prompt[i] = "word "[i % 5];
  limit_prompt[65536] = '\0';
  memset(long_name, 'q', 10000);
  long_name[10000] = '\0';

  if (sd_pipeline_load(model, NULL, &pipe) != SD_OK ||
      sd_pipeline_load(model, NULL, &fuzz_refiner) != SD_OK) {
    fprintf(stderr, "cannot load %s: %s\n", model, sd_last_error());
    return 1;
  }
  fuzz_pipe = pipe;
  real_runs(pipe, light);
  for (n = 0; n < cases; n++) {
    struct big_params b;
    struct owned_image images[2];
    const char *names[5];
    char what[200];
    int k, changes = 1 + (int)below(3);
    memset(&b, 0, sizeof b);
    memset(images, 0, sizeof images);
    sd_generate_params_init(&b.p, sizeof b.p);
    b.p.prompt = "a red circle";
    b.p.steps = 1;
    b.p.width = b.p.height = 32;
    b.p.seed = rnd();
    b.p.paste_back = (int32_t)(rnd() % 3) - 1;
    for (k = 0; k < changes; k++) names[k] = mutate(&b, images, chance(10));
    if (light) names[changes++] = certainly_bad(&b);
    what[0] = '\0';
    for (k = 0; k < changes; k++) {
      strncat(what, names[k], sizeof what - strlen(what) - 3);
      if (k + 1 < changes) strcat(what, ", ");
    }
    run_case(pipe, &b, what, n, &counts);
    free(images[0].pixels);
    free(images[1].pixels);
    accessor_checks(pipe, &counts);
  }
  sd_pipeline_free(pipe);
  sd_pipeline_free(fuzz_refiner);
  free(long_prompt);
  free(limit_prompt);
  free(long_name);

  printf("abi_fuzz: %ld cases (%ld refused by submit and generate alike, %ld accepted by both), "
         "%ld accessor checks, %ld broken promise(s)\n",
         counts.cases, counts.refused, counts.accepted, counts.accessor_checks, failures);
  return failures ? 1 : 0;
}
