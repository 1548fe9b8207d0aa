/*
 * StableDiffusion for Godot 3: a GDNative library (C API, NativeScript 1.1) over
 * libstable_diffusion's C ABI (include/stable_diffusion.h).
 *
 * It registers one class, `StableDiffusion` (extends Reference):
 *
 *     load(model_path: String, options: Dictionary = {}) -> bool
 *     load_async(model_path: String, options: Dictionary = {}) -> bool
 *     poll_load() -> Dictionary         state, part, bytes, fraction, done, status, error, loaded
 *     cancel_load() -> bool
 *     unload() -> void
 *     is_loaded() -> bool
 *     get_info() -> Dictionary          what the model is (native size, family, scheduler)
 *     generate_async(params: Dictionary) -> bool
 *     poll() -> Dictionary              state, step, total, elapsed, done, status, error, preview, log
 *     cancel() -> bool
 *     take_image() -> Image             the finished job's first image (null on failure)
 *     take_images() -> Array            all of them
 *     last_error() -> String
 *     version() -> String
 *     live_handles() -> Dictionary      counts of live library handles in this process (tests)
 *
 * Generation runs on the library's worker thread (sd_job_submit), so Godot's main thread never
 * waits for it: poll() reads the progress without blocking. The step callback runs on that
 * worker thread and touches nothing of Godot's: it copies the latest preview
 * (sd_step_preview) into a buffer of this instance under a mutex, and poll() turns it into an
 * Image on the main thread. The library's log messages are queued the same way.
 *
 * load_async() loads on the library's worker thread (sd_pipeline_load_async) while the model
 * loaded before stays usable; poll_load() reports its progress and, once it succeeded, puts
 * the new model in place of the old one (as load() would) on the main thread.
 *
 * Ownership: an instance owns at most one pipeline, one job and one load job. unload(), load()
 * and the instance's destruction free the job (cancelling it and waiting for its worker, at
 * most about one denoising step), the load job (likewise, at most about one tensor's read)
 * and then the pipeline; images are released as soon as they are copied into Godot Images.
 */
#include <gdnative_api_struct.gen.h>

#include "stable_diffusion.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SD_GD_EXPORT __attribute__((visibility("default")))
#define CLASS_NAME "StableDiffusion"

/* Godot's Image formats (core/image.h, Godot 3.x). */
enum { IMAGE_FORMAT_L8 = 0, IMAGE_FORMAT_RGB8 = 4, IMAGE_FORMAT_RGBA8 = 5 };

/* Log lines kept between two polls; older ones beyond this are dropped (and counted). */
#define MAX_PENDING_LOG 64

static const godot_gdnative_core_api_struct *api = NULL;
static const godot_gdnative_ext_nativescript_api_struct *ns_api = NULL;
static const godot_gdnative_ext_nativescript_1_1_api_struct *ns11_api = NULL;

/* Method binds of the engine classes used here, looked up once in godot_nativescript_init. */
static struct {
  godot_method_bind *image_create_from_data, *image_get_format, *image_get_width,
      *image_get_height, *image_get_data, *image_convert, *image_is_compressed,
      *image_decompress, *resource_duplicate, *object_is_class;
  godot_class_constructor image_new;
} gd;

/* Live handles of the library in this process, for tests (live_handles()). */
static struct {
  long instances, pipelines, jobs, load_jobs, images;
} live;

static void live_add(long *counter, long delta) { __atomic_add_fetch(counter, delta, __ATOMIC_SEQ_CST); }

static long live_get(long *counter) { return __atomic_load_n(counter, __ATOMIC_SEQ_CST); }

/* ------------------------------------------------------------------------------------------ */
/* Variants and strings                                                                       */

static godot_variant v_nil(void) {
  godot_variant v;
  api->godot_variant_new_nil(&v);
  return v;
}

static godot_variant v_bool(int b) {
  godot_variant v;
  api->godot_variant_new_bool(&v, b ? 1 : 0);
  return v;
}

static godot_variant v_int(int64_t i) {
  godot_variant v;
  api->godot_variant_new_int(&v, i);
  return v;
}

static godot_variant v_real(double r) {
  godot_variant v;
  api->godot_variant_new_real(&v, r);
  return v;
}

static godot_variant v_str(const char *utf8) {
  godot_string s = api->godot_string_chars_to_utf8(utf8 ? utf8 : "");
  godot_variant v;
  api->godot_variant_new_string(&v, &s);
  api->godot_string_destroy(&s);
  return v;
}

/* Sets d[key] = value and destroys value. */
static void dict_put(godot_dictionary *d, const char *key, godot_variant value) {
  godot_variant k = v_str(key);
  api->godot_dictionary_set(d, &k, &value);
  api->godot_variant_destroy(&k);
  api->godot_variant_destroy(&value);
}

/* Wraps a dictionary into a variant and destroys the dictionary. */
static godot_variant v_dict(godot_dictionary *d) {
  godot_variant v;
  api->godot_variant_new_dictionary(&v, d);
  api->godot_dictionary_destroy(d);
  return v;
}

/* A malloc'ed UTF-8 copy of a variant's text (its str() for non-strings). */
static char *variant_utf8(const godot_variant *v) {
  godot_string s = api->godot_variant_as_string(v);
  godot_char_string cs = api->godot_string_utf8(&s);
  const char *data = api->godot_char_string_get_data(&cs);
  godot_int n = api->godot_char_string_length(&cs);
  char *out = malloc((size_t)n + 1);
  if (out) {
    memcpy(out, data, (size_t)n);
    out[n] = '\0';
  }
  api->godot_char_string_destroy(&cs);
  api->godot_string_destroy(&s);
  return out;
}

static const char *type_name(godot_variant_type t) {
  static const char *names[] = {"null", "bool", "int", "float", "String", "Vector2", "Rect2",
                                "Vector3", "Transform2D", "Plane", "Quat", "AABB", "Basis",
                                "Transform", "Color", "NodePath", "RID", "Object", "Dictionary",
                                "Array", "PoolByteArray", "PoolIntArray", "PoolRealArray",
                                "PoolStringArray", "PoolVector2Array", "PoolVector3Array",
                                "PoolColorArray"};
  return (t >= 0 && (size_t)t < sizeof names / sizeof names[0]) ? names[t] : "?";
}

/* Calls an engine method with variant arguments; returns its result (to destroy). */
static godot_variant call_method(godot_method_bind *mb, godot_object *obj, int argc, ...) {
  const godot_variant *args[8];
  va_list ap;
  int i;
  va_start(ap, argc);
  for (i = 0; i < argc && i < 8; i++) args[i] = va_arg(ap, const godot_variant *);
  va_end(ap);
  return api->godot_method_bind_call(mb, obj, args, argc, NULL);
}

static int64_t call_int(godot_method_bind *mb, godot_object *obj) {
  godot_variant r = call_method(mb, obj, 0);
  int64_t i = api->godot_variant_as_int(&r);
  api->godot_variant_destroy(&r);
  return i;
}

static int is_image(godot_object *obj) {
  godot_variant name = v_str("Image");
  godot_variant r = call_method(gd.object_is_class, obj, 1, &name);
  int yes = api->godot_variant_as_bool(&r);
  api->godot_variant_destroy(&r);
  api->godot_variant_destroy(&name);
  return yes;
}

/* ------------------------------------------------------------------------------------------ */
/* The instance                                                                               */

typedef struct {
  sd_pipeline *pipe;
  sd_job *job;
  sd_load_job *load_job;
  char *load_path;    /* what load_job loads, for messages */
  int outcome_known;  /* the finished job's status has been read (sd_job_wait) */
  sd_status outcome;
  char *job_error;    /* the finished job's message, when it failed or was cancelled */
  char *last_error;

  /* Shared with the worker thread (step and log callbacks), under lock. */
  pthread_mutex_t lock;
  int want_preview;
  uint8_t *preview;
  size_t preview_cap;
  uint32_t preview_width, preview_height, preview_channels, preview_step;
  unsigned preview_serial, preview_seen;
  char *pending_log[MAX_PENDING_LOG];
  size_t pending_log_count;
  unsigned long log_dropped;
} sd_gd;

static void set_error(sd_gd *self, const char *fmt, ...) {
  va_list ap;
  char buf[2048];
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  free(self->last_error);
  self->last_error = strdup(buf);
}

static void clear_error(sd_gd *self) {
  free(self->last_error);
  self->last_error = NULL;
}

/* Frees the job (cancelling it and waiting for its worker when it runs) and its leftovers. */
static void drop_job(sd_gd *self) {
  size_t i;
  if (self->job) {
    sd_job_free(self->job);
    self->job = NULL;
    live_add(&live.jobs, -1);
  }
  self->outcome_known = 0;
  self->outcome = SD_OK;
  free(self->job_error);
  self->job_error = NULL;
  /* The worker has stopped: no callback runs any more, but keep to the lock anyway. */
  pthread_mutex_lock(&self->lock);
  self->preview_serial = self->preview_seen = 0;
  self->preview_width = self->preview_height = self->preview_channels = self->preview_step = 0;
  for (i = 0; i < self->pending_log_count; i++) free(self->pending_log[i]);
  self->pending_log_count = 0;
  self->log_dropped = 0;
  pthread_mutex_unlock(&self->lock);
}

/* Frees the load job (cancelling it and waiting for its worker when it runs). */
static void drop_load(sd_gd *self) {
  if (self->load_job) {
    sd_load_job_free(self->load_job);
    self->load_job = NULL;
    live_add(&live.load_jobs, -1);
  }
  free(self->load_path);
  self->load_path = NULL;
}

static void drop_pipeline(sd_gd *self) {
  drop_job(self);
  if (self->pipe) {
    sd_pipeline_free(self->pipe);
    self->pipe = NULL;
    live_add(&live.pipelines, -1);
  }
}

/* Worker thread: keeps the latest preview. Touches nothing of Godot's. */
static int32_t on_step(const sd_step_info *info, void *user_data) {
  sd_gd *self = (sd_gd *)user_data;
  const sd_image *img = NULL;
  if (!self->want_preview) return SD_STEP_CONTINUE;
  if (sd_step_preview(info, 0, &img) != SD_OK || !img) return SD_STEP_CONTINUE;
  pthread_mutex_lock(&self->lock);
  {
    size_t row = (size_t)img->width * img->channels;
    size_t need = row * img->height;
    if (need > self->preview_cap) {
      uint8_t *grown = realloc(self->preview, need);
      if (!grown) {
        pthread_mutex_unlock(&self->lock);
        return SD_STEP_CONTINUE;
      }
      self->preview = grown;
      self->preview_cap = need;
    }
    for (uint32_t y = 0; y < img->height; y++)
      memcpy(self->preview + y * row, img->data + (size_t)y * img->stride, row);
    self->preview_width = img->width;
    self->preview_height = img->height;
    self->preview_channels = img->channels;
    self->preview_step = info->step;
    self->preview_serial++;
  }
  pthread_mutex_unlock(&self->lock);
  return SD_STEP_CONTINUE;
}

/* Worker thread (or the caller's): queues a log line for the next poll(). */
static void on_log(sd_log_level level, const char *message, void *user_data) {
  static const char *names[] = {"debug", "info", "warn", "error"};
  sd_gd *self = (sd_gd *)user_data;
  const char *name = (level >= 0 && level <= 3) ? names[level] : "?";
  size_t n = strlen(name) + strlen(message) + 4;
  char *line = malloc(n);
  if (!line) return;
  snprintf(line, n, "[%s] %s", name, message);
  pthread_mutex_lock(&self->lock);
  if (self->pending_log_count == MAX_PENDING_LOG) {
    free(self->pending_log[0]);
    memmove(self->pending_log, self->pending_log + 1, (MAX_PENDING_LOG - 1) * sizeof(char *));
    self->pending_log_count--;
    self->log_dropped++;
  }
  self->pending_log[self->pending_log_count++] = line;
  pthread_mutex_unlock(&self->lock);
}

static GDCALLINGCONV void *sd_gd_create(godot_object *owner, void *method_data) {
  sd_gd *self = calloc(1, sizeof *self);
  (void)owner;
  (void)method_data;
  if (!self) return NULL;
  pthread_mutex_init(&self->lock, NULL);
  live_add(&live.instances, 1);
  return self;
}

static GDCALLINGCONV void sd_gd_destroy(godot_object *owner, void *method_data, void *user_data) {
  sd_gd *self = (sd_gd *)user_data;
  (void)owner;
  (void)method_data;
  if (!self) return;
  drop_load(self);
  drop_pipeline(self);
  free(self->preview);
  free(self->last_error);
  pthread_mutex_destroy(&self->lock);
  free(self);
  live_add(&live.instances, -1);
}

/* ------------------------------------------------------------------------------------------ */
/* Dictionaries onto the library's structs                                                    */

typedef enum { K_STR, K_U32, K_U64, K_F64, K_BOOL, K_CHOICE } field_kind;

typedef struct {
  const char *name;
  int32_t value;
} choice;

typedef struct {
  const char *key;
  field_kind kind;
  size_t offset;
  const choice *choices; /* K_CHOICE: names accepted besides the plain int */
} field;

static const choice dtypes[] = {{"fp32", SD_DTYPE_FP32}, {"fp16", SD_DTYPE_FP16},
                                {"bf16", SD_DTYPE_BF16}, {NULL, 0}};
static const choice weight_kernels[] = {{"auto", SD_WEIGHTS_AUTO}, {"plain", SD_WEIGHTS_PLAIN},
                                        {"packed", SD_WEIGHTS_PACKED}, {NULL, 0}};
static const choice prompt_syntaxes[] = {{"plain", SD_PROMPT_PLAIN}, {"a1111", SD_PROMPT_A1111},
                                         {NULL, 0}};
static const choice seamless_axes[] = {{"none", SD_SEAMLESS_NONE}, {"x", SD_SEAMLESS_X},
                                       {"y", SD_SEAMLESS_Y},       {"xy", SD_SEAMLESS_XY},
                                       {NULL, 0}};
static const choice vae_tilings[] = {{"auto", SD_VAE_TILING_AUTO}, {"on", SD_VAE_TILING_ON},
                                     {"off", SD_VAE_TILING_OFF}, {NULL, 0}};

#define LOAD_FIELD(key, kind, choices) {#key, kind, offsetof(sd_load_options, key), choices}
static const field load_fields[] = {
    LOAD_FIELD(device, K_STR, NULL),          LOAD_FIELD(dtype, K_CHOICE, dtypes),
    LOAD_FIELD(scheduler, K_STR, NULL),       LOAD_FIELD(config_dir, K_STR, NULL),
    LOAD_FIELD(use_ema, K_BOOL, NULL),        LOAD_FIELD(copy_weights, K_BOOL, NULL),
    LOAD_FIELD(plain_weights, K_CHOICE, weight_kernels),
    LOAD_FIELD(lora_dir, K_STR, NULL),        LOAD_FIELD(embeddings_dir, K_STR, NULL),
    LOAD_FIELD(tiny_vae, K_STR, NULL),        LOAD_FIELD(num_threads, K_U32, NULL),
    {NULL, K_STR, 0, NULL}};

#define GEN_FIELD(key, kind, choices) {#key, kind, offsetof(sd_generate_params, key), choices}
static const field generate_fields[] = {
    GEN_FIELD(prompt, K_STR, NULL),
    GEN_FIELD(negative_prompt, K_STR, NULL),
    GEN_FIELD(steps, K_U32, NULL),
    GEN_FIELD(batch, K_U32, NULL),
    GEN_FIELD(width, K_U32, NULL),
    GEN_FIELD(height, K_U32, NULL),
    GEN_FIELD(guidance, K_F64, NULL),
    GEN_FIELD(seed, K_U64, NULL),
    GEN_FIELD(strength, K_F64, NULL),
    GEN_FIELD(eta, K_F64, NULL),
    GEN_FIELD(clip_skip, K_U32, NULL),
    GEN_FIELD(output_channels, K_U32, NULL),
    GEN_FIELD(scheduler, K_STR, NULL),
    GEN_FIELD(paste_back, K_BOOL, NULL),
    GEN_FIELD(cache_interval, K_U32, NULL),
    GEN_FIELD(cache_branch, K_U32, NULL),
    GEN_FIELD(token_merging, K_F64, NULL),
    GEN_FIELD(int8_linear, K_BOOL, NULL),
    GEN_FIELD(prompt_2, K_STR, NULL),
    GEN_FIELD(negative_prompt_2, K_STR, NULL),
    GEN_FIELD(original_width, K_U32, NULL),
    GEN_FIELD(original_height, K_U32, NULL),
    GEN_FIELD(crop_left, K_U32, NULL),
    GEN_FIELD(crop_top, K_U32, NULL),
    GEN_FIELD(target_width, K_U32, NULL),
    GEN_FIELD(target_height, K_U32, NULL),
    GEN_FIELD(guidance_rescale, K_F64, NULL),
    GEN_FIELD(aesthetic_score, K_F64, NULL),
    GEN_FIELD(negative_aesthetic_score, K_F64, NULL),
    GEN_FIELD(prompt_syntax, K_CHOICE, prompt_syntaxes),
    GEN_FIELD(seamless, K_CHOICE, seamless_axes),
    GEN_FIELD(vae_tiling, K_CHOICE, vae_tilings),
    GEN_FIELD(vae_tile_size, K_U32, NULL),
    GEN_FIELD(tiny_vae_decode, K_BOOL, NULL),
    {NULL, K_STR, 0, NULL}};

/* What a call borrows from Godot until the library has copied it: strings and images. */
typedef struct {
  char *strings[64];
  size_t string_count;
  struct held_image {
    godot_variant holder; /* a converted copy of the Image, when one was made (else nil) */
    godot_pool_byte_array bytes;
    godot_pool_byte_array_read_access *read;
    sd_image image;
    int used;
  } images[2];
} borrowed;

static void borrowed_free(borrowed *b) {
  size_t i;
  for (i = 0; i < b->string_count; i++) free(b->strings[i]);
  b->string_count = 0;
  for (i = 0; i < 2; i++) {
    struct held_image *h = &b->images[i];
    if (!h->used) continue;
    if (h->read) api->godot_pool_byte_array_read_access_destroy(h->read);
    api->godot_pool_byte_array_destroy(&h->bytes);
    api->godot_variant_destroy(&h->holder);
    h->used = 0;
  }
}

/* Reads a Godot Image into h->image (L8, RGB8 or RGBA8 as it is; anything else converted to
 * RGBA8 on a copy). Returns 0 with an error set on failure. */
static int borrow_image(sd_gd *self, const char *what, const godot_variant *value,
                        struct held_image *h) {
  godot_object *obj;
  int64_t format, width, height, channels;
  godot_variant data;
  memset(h, 0, sizeof *h);
  h->holder = v_nil();
  api->godot_pool_byte_array_new(&h->bytes);
  h->used = 1;
  if (api->godot_variant_get_type(value) != GODOT_VARIANT_TYPE_OBJECT ||
      !(obj = api->godot_variant_as_object(value)) || !is_image(obj)) {
    set_error(self, "generate_async: '%s' must be an Image, got %s", what,
              type_name(api->godot_variant_get_type(value)));
    return 0;
  }
  format = call_int(gd.image_get_format, obj);
  if (call_int(gd.image_is_compressed, obj) ||
      (format != IMAGE_FORMAT_L8 && format != IMAGE_FORMAT_RGB8 && format != IMAGE_FORMAT_RGBA8)) {
    godot_variant deep = v_bool(0), rgba = v_int(IMAGE_FORMAT_RGBA8), r;
    api->godot_variant_destroy(&h->holder);
    h->holder = call_method(gd.resource_duplicate, obj, 1, &deep);
    obj = api->godot_variant_as_object(&h->holder);
    if (!obj) {
      set_error(self, "generate_async: cannot copy '%s' to convert it", what);
      return 0;
    }
    if (call_int(gd.image_is_compressed, obj)) {
      r = call_method(gd.image_decompress, obj, 0);
      api->godot_variant_destroy(&r);
    }
    r = call_method(gd.image_convert, obj, 1, &rgba);
    api->godot_variant_destroy(&r);
    format = call_int(gd.image_get_format, obj);
    if (format != IMAGE_FORMAT_RGBA8) {
      set_error(self, "generate_async: cannot convert '%s' to RGBA8 (format %lld)", what,
                (long long)format);
      return 0;
    }
  }
  width = call_int(gd.image_get_width, obj);
  height = call_int(gd.image_get_height, obj);
  channels = format == IMAGE_FORMAT_L8 ? 1 : format == IMAGE_FORMAT_RGB8 ? 3 : 4;
  data = call_method(gd.image_get_data, obj, 0);
  api->godot_pool_byte_array_destroy(&h->bytes);
  h->bytes = api->godot_variant_as_pool_byte_array(&data);
  api->godot_variant_destroy(&data);
  if (width <= 0 || height <= 0 ||
      api->godot_pool_byte_array_size(&h->bytes) < width * height * channels) {
    set_error(self, "generate_async: '%s' is empty (%lldx%lld)", what, (long long)width,
              (long long)height);
    return 0;
  }
  h->read = api->godot_pool_byte_array_read(&h->bytes);
  h->image.data = api->godot_pool_byte_array_read_access_ptr(h->read);
  h->image.width = (uint32_t)width;
  h->image.height = (uint32_t)height;
  h->image.stride = (uint32_t)(width * channels);
  h->image.channels = (uint32_t)channels;
  return 1;
}

/* Writes one dictionary value into the struct at base. Returns 0 with an error set. */
static int set_field(sd_gd *self, const char *method, const field *f, const godot_variant *value,
                     void *base, borrowed *b) {
  char *at = (char *)base + f->offset;
  godot_variant_type t = api->godot_variant_get_type(value);
  switch (f->kind) {
  case K_STR: {
    char *s;
    if (t != GODOT_VARIANT_TYPE_STRING) break;
    if (b->string_count == sizeof b->strings / sizeof b->strings[0] || !(s = variant_utf8(value))) {
      set_error(self, "%s: out of memory", method);
      return 0;
    }
    b->strings[b->string_count++] = s;
    *(const char **)at = s;
    return 1;
  }
  case K_U32:
  case K_U64: {
    int64_t i;
    if (t != GODOT_VARIANT_TYPE_INT) break;
    i = api->godot_variant_as_int(value);
    if (i < 0 || (f->kind == K_U32 && i > (int64_t)UINT32_MAX)) {
      set_error(self, "%s: '%s' must be from 0 to %s, got %lld", method, f->key,
                f->kind == K_U32 ? "4294967295" : "9223372036854775807", (long long)i);
      return 0;
    }
    if (f->kind == K_U32)
      *(uint32_t *)at = (uint32_t)i;
    else
      *(uint64_t *)at = (uint64_t)i;
    return 1;
  }
  case K_F64:
    if (t != GODOT_VARIANT_TYPE_INT && t != GODOT_VARIANT_TYPE_REAL) break;
    *(double *)at = api->godot_variant_as_real(value);
    return 1;
  case K_BOOL:
    if (t != GODOT_VARIANT_TYPE_BOOL && t != GODOT_VARIANT_TYPE_INT) break;
    *(int32_t *)at = api->godot_variant_as_bool(value) ? 1 : 0;
    return 1;
  case K_CHOICE: {
    const choice *c;
    if (t == GODOT_VARIANT_TYPE_INT) {
      int64_t i = api->godot_variant_as_int(value);
      for (c = f->choices; c->name; c++)
        if (c->value == i) {
          *(int32_t *)at = c->value;
          return 1;
        }
    } else if (t == GODOT_VARIANT_TYPE_STRING) {
      char *s = variant_utf8(value);
      for (c = f->choices; s && c->name; c++)
        if (strcmp(c->name, s) == 0) {
          *(int32_t *)at = c->value;
          free(s);
          return 1;
        }
      free(s);
    } else {
      break;
    }
    {
      char names[256] = "";
      for (c = f->choices; c->name; c++) {
        strncat(names, c->name, sizeof names - strlen(names) - 1);
        if (c[1].name) strncat(names, ", ", sizeof names - strlen(names) - 1);
      }
      set_error(self, "%s: '%s' must be one of %s", method, f->key, names);
    }
    return 0;
  }
  }
  {
    static const char *expected[] = {"a String", "an int", "an int", "a number", "a bool",
                                     "a String or an int"};
    set_error(self, "%s: '%s' must be %s, got %s", method, f->key, expected[f->kind],
              type_name(t));
  }
  return 0;
}

/* Applies every key of dict: the table's fields, then the extras handled by extra(). Unknown
 * keys are errors, so that a typo does not go unnoticed. */
typedef int (*extra_key_fn)(sd_gd *self, const char *key, const godot_variant *value,
                            void *base, borrowed *b);

static int apply_dict(sd_gd *self, const char *method, const godot_dictionary *dict,
                      const field *fields, extra_key_fn extra, void *base, borrowed *b) {
  godot_array keys = api->godot_dictionary_keys(dict);
  godot_int n = api->godot_array_size(&keys), i;
  int ok = 1;
  for (i = 0; ok && i < n; i++) {
    godot_variant key = api->godot_array_get(&keys, i);
    godot_variant value = api->godot_dictionary_get(dict, &key);
    char *name = NULL;
    const field *f;
    int handled = 0;
    if (api->godot_variant_get_type(&key) != GODOT_VARIANT_TYPE_STRING) {
      set_error(self, "%s: keys must be Strings, got %s", method,
                type_name(api->godot_variant_get_type(&key)));
      ok = 0;
    } else if (!(name = variant_utf8(&key))) {
      set_error(self, "%s: out of memory", method);
      ok = 0;
    } else {
      for (f = fields; f->key; f++)
        if (strcmp(f->key, name) == 0) {
          ok = set_field(self, method, f, &value, base, b);
          handled = 1;
          break;
        }
      if (!handled && extra) {
        int r = extra(self, name, &value, base, b);
        handled = r != 2;
        ok = r == 1 || r == 2;
      }
      if (!handled) {
        set_error(self, "%s: unknown key '%s'", method, name);
        ok = 0;
      }
    }
    free(name);
    api->godot_variant_destroy(&value);
    api->godot_variant_destroy(&key);
  }
  api->godot_array_destroy(&keys);
  return ok;
}

/* generate_async's keys beyond the struct's plain fields. Returns 1 (done), 0 (error), 2 (not
 * mine). */
static int generate_extra(sd_gd *self, const char *key, const godot_variant *value, void *base,
                          borrowed *b) {
  sd_generate_params *p = (sd_generate_params *)base;
  if (strcmp(key, "preview") == 0) {
    godot_variant_type t = api->godot_variant_get_type(value);
    if (t != GODOT_VARIANT_TYPE_BOOL && t != GODOT_VARIANT_TYPE_INT) {
      set_error(self, "generate_async: 'preview' must be a bool, got %s", type_name(t));
      return 0;
    }
    self->want_preview = api->godot_variant_as_bool(value) ? 1 : 0;
    return 1;
  }
  if (strcmp(key, "init_image") == 0) {
    if (!borrow_image(self, key, value, &b->images[0])) return 0;
    p->init_image = &b->images[0].image;
    return 1;
  }
  if (strcmp(key, "mask") == 0) {
    if (!borrow_image(self, key, value, &b->images[1])) return 0;
    p->mask = &b->images[1].image;
    return 1;
  }
  return 2;
}

/* ------------------------------------------------------------------------------------------ */
/* Images out                                                                                 */

/* A new Godot Image (RGB8 or RGBA8) holding a copy of img, as a variant that owns it. */
static godot_variant image_variant(const uint8_t *data, uint32_t width, uint32_t height,
                                   uint32_t stride, uint32_t channels) {
  godot_pool_byte_array bytes;
  godot_pool_byte_array_write_access *w;
  godot_variant result, vw, vh, vmip, vfmt, vdata, r;
  godot_object *image;
  size_t row = (size_t)width * channels;
  uint8_t *dst;
  uint32_t y;
  if (channels != 3 && channels != 4) return v_nil();
  api->godot_pool_byte_array_new(&bytes);
  api->godot_pool_byte_array_resize(&bytes, (godot_int)(row * height));
  w = api->godot_pool_byte_array_write(&bytes);
  dst = api->godot_pool_byte_array_write_access_ptr(w);
  for (y = 0; y < height; y++) memcpy(dst + y * row, data + (size_t)y * stride, row);
  api->godot_pool_byte_array_write_access_destroy(w);

  image = gd.image_new();
  api->godot_variant_new_object(&result, image); /* the variant holds the only reference */
  vw = v_int(width);
  vh = v_int(height);
  vmip = v_bool(0);
  vfmt = v_int(channels == 4 ? IMAGE_FORMAT_RGBA8 : IMAGE_FORMAT_RGB8);
  api->godot_variant_new_pool_byte_array(&vdata, &bytes);
  r = call_method(gd.image_create_from_data, image, 5, &vw, &vh, &vmip, &vfmt, &vdata);
  api->godot_variant_destroy(&r);
  api->godot_variant_destroy(&vdata);
  api->godot_variant_destroy(&vfmt);
  api->godot_variant_destroy(&vmip);
  api->godot_variant_destroy(&vh);
  api->godot_variant_destroy(&vw);
  api->godot_pool_byte_array_destroy(&bytes);
  return result;
}

/* ------------------------------------------------------------------------------------------ */
/* Methods                                                                                    */

#define METHOD(name) \
  static GDCALLINGCONV godot_variant name(godot_object *owner, void *method_data, void *user_data, \
                                          int argc, godot_variant **argv)
#define UNUSED_METHOD_ARGS \
  (void)owner;             \
  (void)method_data

/* Checks the argument count; on a mismatch reports it to Godot and to last_error(). */
static int check_args(sd_gd *self, const char *method, int argc, int min, int max) {
  if (argc >= min && argc <= max) return 1;
  set_error(self, "%s takes %d to %d arguments, got %d", method, min, max, argc);
  api->godot_print_error(self->last_error, method, __FILE__, __LINE__);
  return 0;
}

/* The model path and options of load() / load_async(), checked; the path (to free) or NULL
 * with last_error() set. Strings of `options` are borrowed in `b` (free with borrowed_free). */
static char *load_args(sd_gd *self, const char *method, int argc, godot_variant **argv,
                       sd_load_options *options, borrowed *b) {
  char *path;
  memset(b, 0, sizeof *b);
  sd_load_options_init(options, sizeof *options);
  if (!check_args(self, method, argc, 1, 2)) return NULL;
  clear_error(self);
  if (sd_abi_version() != SD_ABI_VERSION) {
    set_error(self, "%s: libstable_diffusion has ABI %u, this plugin was built for %d", method,
              sd_abi_version(), SD_ABI_VERSION);
    return NULL;
  }
  if (api->godot_variant_get_type(argv[0]) != GODOT_VARIANT_TYPE_STRING) {
    set_error(self, "%s: model_path must be a String, got %s", method,
              type_name(api->godot_variant_get_type(argv[0])));
    return NULL;
  }
  if (argc == 2 && api->godot_variant_get_type(argv[1]) != GODOT_VARIANT_TYPE_NIL) {
    godot_dictionary dict;
    int ok;
    if (api->godot_variant_get_type(argv[1]) != GODOT_VARIANT_TYPE_DICTIONARY) {
      set_error(self, "%s: options must be a Dictionary, got %s", method,
                type_name(api->godot_variant_get_type(argv[1])));
      return NULL;
    }
    dict = api->godot_variant_as_dictionary(argv[1]);
    ok = apply_dict(self, method, &dict, load_fields, NULL, options, b);
    api->godot_dictionary_destroy(&dict);
    if (!ok) {
      borrowed_free(b);
      return NULL;
    }
  }
  path = variant_utf8(argv[0]);
  if (!path) {
    set_error(self, "%s: out of memory", method);
    borrowed_free(b);
  }
  return path;
}

/* Makes `pipe` this instance's model. */
static void install_pipeline(sd_gd *self, sd_pipeline *pipe) {
  drop_pipeline(self);
  self->pipe = pipe;
  live_add(&live.pipelines, 1);
  sd_pipeline_set_log_callback(pipe, on_log, self);
}

METHOD(m_load) {
  sd_gd *self = (sd_gd *)user_data;
  sd_load_options options;
  borrowed b;
  char *path;
  sd_status status;
  sd_pipeline *pipe = NULL;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  path = load_args(self, "load", argc, argv, &options, &b);
  if (!path) return v_bool(0);
  /* The arguments are good: release the model loaded before (its memory too) and load. */
  drop_load(self);
  drop_pipeline(self);
  status = sd_pipeline_load(path, &options, &pipe);
  if (status != SD_OK)
    set_error(self, "load %s: %s: %s", path, sd_status_string(status), sd_last_error());
  else
    install_pipeline(self, pipe);
  free(path);
  borrowed_free(&b);
  return v_bool(status == SD_OK);
}

/* Whether the load job is still loading. */
static int load_running(sd_gd *self) {
  sd_load_progress p;
  if (!self->load_job) return 0;
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  sd_load_job_poll(self->load_job, &p);
  return p.state == SD_JOB_QUEUED || p.state == SD_JOB_RUNNING;
}

METHOD(m_load_async) {
  sd_gd *self = (sd_gd *)user_data;
  sd_load_options options;
  borrowed b;
  char *path;
  sd_status status;
  sd_load_job *job = NULL;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  path = load_args(self, "load_async", argc, argv, &options, &b);
  if (!path) return v_bool(0);
  if (load_running(self)) {
    set_error(self, "load_async: a load is still running (cancel_load() it or poll_load() until done)");
    free(path);
    borrowed_free(&b);
    return v_bool(0);
  }
  drop_load(self);
  /* The load's warnings reach the next poll() or poll_load(); `self` outlives the job (its
   * destructor frees the job first). */
  options.log_fn = on_log;
  options.log_user_data = self;
  status = sd_pipeline_load_async(path, &options, &job); /* copies the path and options */
  borrowed_free(&b);
  if (status != SD_OK) {
    set_error(self, "load_async %s: %s: %s", path, sd_status_string(status), sd_last_error());
    free(path);
    return v_bool(0);
  }
  self->load_job = job;
  self->load_path = path;
  live_add(&live.load_jobs, 1);
  return v_bool(1);
}

/* Moves the queued log lines into `d` under "log" (and "log_dropped"). */
static void put_log(sd_gd *self, godot_dictionary *d) {
  godot_array log;
  int have_log = 0;
  size_t i;
  unsigned long dropped;
  api->godot_array_new(&log);
  pthread_mutex_lock(&self->lock);
  dropped = self->log_dropped;
  for (i = 0; i < self->pending_log_count; i++) {
    godot_variant line = v_str(self->pending_log[i]);
    api->godot_array_push_back(&log, &line);
    api->godot_variant_destroy(&line);
    free(self->pending_log[i]);
    have_log = 1;
  }
  self->pending_log_count = 0;
  self->log_dropped = 0;
  pthread_mutex_unlock(&self->lock);
  if (have_log) {
    godot_variant v;
    api->godot_variant_new_array(&v, &log);
    dict_put(d, "log", v);
    if (dropped) dict_put(d, "log_dropped", v_int((int64_t)dropped));
  }
  api->godot_array_destroy(&log);
}

static const char *state_name(int state);

METHOD(m_poll_load) {
  sd_gd *self = (sd_gd *)user_data;
  godot_dictionary d;
  sd_load_progress p;
  int done;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  api->godot_dictionary_new(&d);
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  if (self->load_job) sd_load_job_poll(self->load_job, &p);
  done = self->load_job && p.state != SD_JOB_QUEUED && p.state != SD_JOB_RUNNING;
  dict_put(&d, "state", v_int(self->load_job ? p.state : -1));
  dict_put(&d, "state_name", v_str(self->load_job ? state_name(p.state) : "idle"));
  dict_put(&d, "part", v_str(p.component ? p.component : ""));
  dict_put(&d, "tensors_done", v_int((int64_t)p.tensors_done));
  dict_put(&d, "bytes_done", v_int((int64_t)p.bytes_done));
  dict_put(&d, "bytes_total", v_int((int64_t)p.bytes_total));
  dict_put(&d, "fraction",
           v_real(p.bytes_total ? (double)p.bytes_done / (double)p.bytes_total : (done ? 1.0 : 0.0)));
  dict_put(&d, "elapsed", v_real(p.elapsed_seconds));
  dict_put(&d, "done", v_bool(done));
  /* The load's log lines first: installing the model drops what a job left queued. */
  put_log(self, &d);
  if (done) {
    /* Finished: install the model or keep the error, then forget the job (reported once). */
    sd_pipeline *pipe = NULL;
    sd_status status = sd_load_job_take_pipeline(self->load_job, &pipe);
    if (status == SD_OK) {
      install_pipeline(self, pipe);
      clear_error(self);
    } else {
      set_error(self, "load_async %s: %s: %s", self->load_path ? self->load_path : "?",
                sd_status_string(status), sd_last_error());
      dict_put(&d, "error", v_str(self->last_error));
    }
    dict_put(&d, "status", v_int(status));
    dict_put(&d, "status_name", v_str(sd_status_string(status)));
    dict_put(&d, "loaded", v_bool(status == SD_OK));
    drop_load(self);
  }
  return v_dict(&d);
}

METHOD(m_cancel_load) {
  sd_gd *self = (sd_gd *)user_data;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  if (!load_running(self)) return v_bool(0);
  sd_load_job_cancel(self->load_job);
  return v_bool(1);
}

METHOD(m_unload) {
  sd_gd *self = (sd_gd *)user_data;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  drop_load(self);
  drop_pipeline(self);
  return v_nil();
}

METHOD(m_is_loaded) {
  sd_gd *self = (sd_gd *)user_data;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  return v_bool(self->pipe != NULL);
}

METHOD(m_get_info) {
  sd_gd *self = (sd_gd *)user_data;
  godot_dictionary d;
  sd_pipeline_info info;
  static const char *families[] = {"?", "sd1", "sd2", "sdxl", "sdxl_refiner"};
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  api->godot_dictionary_new(&d);
  if (!self->pipe) return v_dict(&d);
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  if (sd_pipeline_get_info(self->pipe, &info) != SD_OK) {
    set_error(self, "get_info: %s", sd_last_error());
    return v_dict(&d);
  }
  dict_put(&d, "family", v_str(info.family >= 1 && info.family <= 4 ? families[info.family] : "?"));
  dict_put(&d, "native_width", v_int(info.native_width));
  dict_put(&d, "native_height", v_int(info.native_height));
  dict_put(&d, "vae_scale_factor", v_int(info.vae_scale_factor));
  dict_put(&d, "unet_in_channels", v_int(info.unet_in_channels));
  dict_put(&d, "default_scheduler", v_str(info.default_scheduler));
  return v_dict(&d);
}

METHOD(m_generate_async) {
  sd_gd *self = (sd_gd *)user_data;
  sd_generate_params params;
  borrowed b;
  godot_dictionary dict;
  sd_status status;
  sd_job *job = NULL;
  int ok;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  if (!check_args(self, "generate_async", argc, 1, 1)) return v_bool(0);
  clear_error(self);
  if (!self->pipe) {
    set_error(self, "generate_async: no model loaded (call load first)");
    return v_bool(0);
  }
  if (api->godot_variant_get_type(argv[0]) != GODOT_VARIANT_TYPE_DICTIONARY) {
    set_error(self, "generate_async: params must be a Dictionary, got %s",
              type_name(api->godot_variant_get_type(argv[0])));
    return v_bool(0);
  }
  if (self->job) {
    sd_job_progress p;
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    sd_job_poll(self->job, &p);
    if (p.state == SD_JOB_QUEUED || p.state == SD_JOB_RUNNING) {
      set_error(self, "generate_async: a job is still running (cancel() it or poll() until done)");
      return v_bool(0);
    }
  }
  memset(&b, 0, sizeof b);
  sd_generate_params_init(&params, sizeof params);
  self->want_preview = 1; /* read by on_step only, and no job of this instance runs now */
  dict = api->godot_variant_as_dictionary(argv[0]);
  ok = apply_dict(self, "generate_async", &dict, generate_fields, generate_extra, &params, &b);
  api->godot_dictionary_destroy(&dict);
  if (ok) {
    drop_job(self); /* the finished one: its images not taken are released */
    params.on_step = on_step;
    params.step_user_data = self;
    status = sd_job_submit(self->pipe, &params, &job); /* copies strings and images */
    if (status == SD_OK) {
      self->job = job;
      live_add(&live.jobs, 1);
    } else {
      set_error(self, "generate_async: %s: %s", sd_status_string(status), sd_last_error());
      ok = 0;
    }
  }
  borrowed_free(&b);
  return v_bool(ok);
}

static const char *state_name(int state) {
  switch (state) {
  case SD_JOB_QUEUED: return "queued";
  case SD_JOB_RUNNING: return "running";
  case SD_JOB_SUCCEEDED: return "succeeded";
  case SD_JOB_FAILED: return "failed";
  case SD_JOB_CANCELLED: return "cancelled";
  default: return "idle";
  }
}

METHOD(m_poll) {
  sd_gd *self = (sd_gd *)user_data;
  godot_dictionary d;
  sd_job_progress p;
  int done;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  api->godot_dictionary_new(&d);
  if (!self->job) {
    dict_put(&d, "state", v_int(-1));
    dict_put(&d, "state_name", v_str("idle"));
    dict_put(&d, "step", v_int(0));
    dict_put(&d, "total", v_int(0));
    dict_put(&d, "elapsed", v_real(0));
    dict_put(&d, "done", v_bool(0));
    return v_dict(&d);
  }
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  sd_job_poll(self->job, &p);
  done = p.state == SD_JOB_SUCCEEDED || p.state == SD_JOB_FAILED || p.state == SD_JOB_CANCELLED;
  if (done && !self->outcome_known) {
    /* Finished: read its outcome and message once (does not wait). */
    self->outcome = sd_job_wait(self->job, 0);
    self->outcome_known = 1;
    if (self->outcome != SD_OK) {
      self->job_error = strdup(sd_last_error());
      set_error(self, "%s: %s", sd_status_string(self->outcome),
                self->job_error ? self->job_error : "");
    }
  }
  dict_put(&d, "state", v_int(p.state));
  dict_put(&d, "state_name", v_str(state_name(p.state)));
  dict_put(&d, "step", v_int(p.step));
  dict_put(&d, "total", v_int(p.total));
  dict_put(&d, "elapsed", v_real(p.elapsed_seconds));
  dict_put(&d, "done", v_bool(done));
  if (done) {
    dict_put(&d, "status", v_int(self->outcome));
    dict_put(&d, "status_name", v_str(sd_status_string(self->outcome)));
    if (self->outcome != SD_OK) dict_put(&d, "error", v_str(self->job_error));
  }
  {
    /* The latest preview, when a new one came since the last poll. */
    godot_variant image = v_nil();
    pthread_mutex_lock(&self->lock);
    if (self->preview_serial != self->preview_seen && self->preview_width) {
      api->godot_variant_destroy(&image);
      image = image_variant(self->preview, self->preview_width, self->preview_height,
                            self->preview_width * self->preview_channels, self->preview_channels);
      self->preview_seen = self->preview_serial;
      dict_put(&d, "preview_step", v_int(self->preview_step));
    }
    pthread_mutex_unlock(&self->lock);
    if (api->godot_variant_get_type(&image) != GODOT_VARIANT_TYPE_NIL)
      dict_put(&d, "preview", image);
    else
      api->godot_variant_destroy(&image);
  }
  put_log(self, &d);
  return v_dict(&d);
}

METHOD(m_cancel) {
  sd_gd *self = (sd_gd *)user_data;
  sd_job_progress p;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  if (!self->job) return v_bool(0);
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  sd_job_poll(self->job, &p);
  if (p.state != SD_JOB_QUEUED && p.state != SD_JOB_RUNNING) return v_bool(0);
  sd_job_cancel(self->job);
  return v_bool(1);
}

/* Moves the finished job's images into an Array of Godot Images (nil on failure). */
static godot_variant take(sd_gd *self, const char *method, int all) {
  sd_images *images = NULL;
  sd_status status;
  size_t count = 0, i;
  godot_array list;
  godot_variant result;
  if (!self) return v_nil();
  clear_error(self);
  if (!self->job) {
    set_error(self, "%s: no job (call generate_async first)", method);
    return v_nil();
  }
  status = sd_job_take_images(self->job, &images);
  if (status != SD_OK) {
    if (status == SD_NOT_READY)
      set_error(self, "%s: the job has not finished (poll() until done)", method);
    else
      set_error(self, "%s: %s: %s", method, sd_status_string(status), sd_last_error());
    return v_nil();
  }
  live_add(&live.images, 1);
  sd_images_count(images, &count);
  api->godot_array_new(&list);
  for (i = 0; i < count; i++) {
    const sd_image *img = NULL;
    godot_variant v;
    if (sd_images_get(images, i, &img) != SD_OK || !img) continue;
    v = image_variant(img->data, img->width, img->height, img->stride, img->channels);
    api->godot_array_push_back(&list, &v);
    api->godot_variant_destroy(&v);
    if (!all) break;
  }
  sd_images_free(images);
  live_add(&live.images, -1);
  if (all) {
    api->godot_variant_new_array(&result, &list);
  } else if (api->godot_array_size(&list) > 0) {
    result = api->godot_array_get(&list, 0);
  } else {
    set_error(self, "%s: the job produced no image", method);
    result = v_nil();
  }
  api->godot_array_destroy(&list);
  return result;
}

METHOD(m_take_image) {
  UNUSED_METHOD_ARGS;
  (void)argc;
  (void)argv;
  return take((sd_gd *)user_data, "take_image", 0);
}

METHOD(m_take_images) {
  UNUSED_METHOD_ARGS;
  (void)argc;
  (void)argv;
  return take((sd_gd *)user_data, "take_images", 1);
}

METHOD(m_last_error) {
  sd_gd *self = (sd_gd *)user_data;
  UNUSED_METHOD_ARGS;
  if (!self) return v_nil(); /* its constructor ran out of memory */
  (void)argc;
  (void)argv;
  return v_str(self->last_error ? self->last_error : "");
}

METHOD(m_version) {
  char buf[128];
  UNUSED_METHOD_ARGS;
  (void)user_data;
  (void)argc;
  (void)argv;
  snprintf(buf, sizeof buf, "libstable_diffusion %s, ABI %u (plugin built for ABI %d)",
           sd_version(), sd_abi_version(), SD_ABI_VERSION);
  return v_str(buf);
}

METHOD(m_live_handles) {
  godot_dictionary d;
  UNUSED_METHOD_ARGS;
  (void)user_data;
  (void)argc;
  (void)argv;
  api->godot_dictionary_new(&d);
  dict_put(&d, "instances", v_int(live_get(&live.instances)));
  dict_put(&d, "pipelines", v_int(live_get(&live.pipelines)));
  dict_put(&d, "jobs", v_int(live_get(&live.jobs)));
  dict_put(&d, "load_jobs", v_int(live_get(&live.load_jobs)));
  dict_put(&d, "images", v_int(live_get(&live.images)));
  return v_dict(&d);
}

/* ------------------------------------------------------------------------------------------ */
/* Registration                                                                               */

typedef struct {
  const char *name;
  GDCALLINGCONV godot_variant (*fn)(godot_object *, void *, void *, int, godot_variant **);
  const char *doc;
  const char *args[2]; /* argument names */
  godot_variant_type arg_types[2];
} method_spec;

static const method_spec methods[] = {
    {"load", m_load,
     "Loads a model (diffusers folder, .safetensors / .ckpt file or TorchScript export) on the "
     "calling thread, replacing the one loaded. Options: device, dtype, scheduler, config_dir, "
     "use_ema, copy_weights, plain_weights, lora_dir, embeddings_dir. Returns false with "
     "last_error() set on failure.",
     {"model_path", "options"},
     {GODOT_VARIANT_TYPE_STRING, GODOT_VARIANT_TYPE_DICTIONARY}},
    {"load_async", m_load_async,
     "Starts loading a model on a worker thread and returns at once; the model loaded before "
     "stays usable until poll_load() installs the new one (cancelling a job still running on "
     "it, as load() does). Options as load(). Returns false "
     "with last_error() set when refused (bad arguments, a load still running).",
     {"model_path", "options"},
     {GODOT_VARIANT_TYPE_STRING, GODOT_VARIANT_TYPE_DICTIONARY}},
    {"poll_load", m_poll_load,
     "The async load's progress without blocking: state, state_name, part, tensors_done, "
     "bytes_done, bytes_total, fraction, elapsed, done; once done (reported once, then idle) "
     "status, status_name, loaded (the new model is in place) or error; log lines.",
     {NULL, NULL},
     {0, 0}},
    {"cancel_load", m_cancel_load, "Asks the async load to stop; true when one was running.",
     {NULL, NULL},
     {0, 0}},
    {"unload", m_unload, "Cancels the job and the async load, frees them and the model.",
     {NULL, NULL},
     {0, 0}},
    {"is_loaded", m_is_loaded, "Whether a model is loaded.", {NULL, NULL}, {0, 0}},
    {"get_info", m_get_info,
     "What the model is: family, native_width, native_height, vae_scale_factor, "
     "unet_in_channels, default_scheduler ({} when none is loaded).",
     {NULL, NULL},
     {0, 0}},
    {"generate_async", m_generate_async,
     "Starts a generation on a worker thread and returns at once. Keys: prompt, "
     "negative_prompt, width, height, steps, batch, guidance, seed, scheduler, strength, eta, "
     "clip_skip, output_channels, init_image, mask, paste_back, prompt_syntax, preview, ... "
     "Returns false with last_error() set when refused.",
     {"params", NULL},
     {GODOT_VARIANT_TYPE_DICTIONARY, 0}},
    {"poll", m_poll,
     "Progress without blocking: state, state_name, step, total, elapsed, done; when done "
     "status, status_name and error; preview (an Image) when a new one exists; log lines.",
     {NULL, NULL},
     {0, 0}},
    {"cancel", m_cancel, "Asks the running job to stop; true when one was running.",
     {NULL, NULL},
     {0, 0}},
    {"take_image", m_take_image,
     "The finished job's first image (null with last_error() set when there is none).",
     {NULL, NULL},
     {0, 0}},
    {"take_images", m_take_images, "All of the finished job's images.", {NULL, NULL}, {0, 0}},
    {"last_error", m_last_error, "The message of the last failure (\"\" after a success).",
     {NULL, NULL},
     {0, 0}},
    {"version", m_version, "The library's version and ABI.", {NULL, NULL}, {0, 0}},
    {"live_handles", m_live_handles,
     "Counts of live instances, pipelines, jobs and image sets in this process.",
     {NULL, NULL},
     {0, 0}},
};

SD_GD_EXPORT void GDAPI godot_gdnative_init(godot_gdnative_init_options *options) {
  unsigned i;
  api = options->api_struct;
  for (i = 0; i < api->num_extensions; i++) {
    if (api->extensions[i]->type == GDNATIVE_EXT_NATIVESCRIPT) {
      const godot_gdnative_api_struct *ext = api->extensions[i];
      ns_api = (const godot_gdnative_ext_nativescript_api_struct *)ext;
      for (; ext; ext = ext->next)
        if (ext->version.major == 1 && ext->version.minor == 1)
          ns11_api = (const godot_gdnative_ext_nativescript_1_1_api_struct *)ext;
    }
  }
}

SD_GD_EXPORT void GDAPI godot_gdnative_terminate(godot_gdnative_terminate_options *options) {
  (void)options;
  api = NULL;
  ns_api = NULL;
  ns11_api = NULL;
}

static godot_method_bind *bind(const char *cls, const char *method) {
  godot_method_bind *mb = api->godot_method_bind_get_method(cls, method);
  if (!mb) {
    char msg[128];
    snprintf(msg, sizeof msg, "StableDiffusion: no method %s.%s in this Godot", cls, method);
    api->godot_print_error(msg, "godot_nativescript_init", __FILE__, __LINE__);
  }
  return mb;
}

SD_GD_EXPORT void GDAPI godot_nativescript_init(void *handle) {
  godot_instance_create_func create = {NULL, NULL, NULL};
  godot_instance_destroy_func destroy = {NULL, NULL, NULL};
  size_t i;
  if (!api || !ns_api) return;

  gd.image_create_from_data = bind("Image", "create_from_data");
  gd.image_get_format = bind("Image", "get_format");
  gd.image_get_width = bind("Image", "get_width");
  gd.image_get_height = bind("Image", "get_height");
  gd.image_get_data = bind("Image", "get_data");
  gd.image_convert = bind("Image", "convert");
  gd.image_is_compressed = bind("Image", "is_compressed");
  gd.image_decompress = bind("Image", "decompress");
  gd.resource_duplicate = bind("Resource", "duplicate");
  gd.object_is_class = bind("Object", "is_class");
  gd.image_new = api->godot_get_class_constructor("Image");

  create.create_func = sd_gd_create;
  destroy.destroy_func = sd_gd_destroy;
  ns_api->godot_nativescript_register_class(handle, CLASS_NAME, "Reference", create, destroy);
  for (i = 0; i < sizeof methods / sizeof methods[0]; i++) {
    godot_instance_method m = {NULL, NULL, NULL};
    godot_method_attributes attributes = {GODOT_METHOD_RPC_MODE_DISABLED};
    m.method = methods[i].fn;
    ns_api->godot_nativescript_register_method(handle, CLASS_NAME, methods[i].name, attributes, m);
  }
  if (!ns11_api) return;
  /* NativeScript 1.1: argument names and documentation, shown by the editor. */
  /* The engine copies the strings passed to it: each is destroyed here after the call. */
  {
    godot_string doc = api->godot_string_chars_to_utf8(
        "Stable Diffusion through libstable_diffusion: load a model, generate_async, poll "
        "every frame, take_image when done.");
    ns11_api->godot_nativescript_set_class_documentation(handle, CLASS_NAME, doc);
    api->godot_string_destroy(&doc);
  }
  for (i = 0; i < sizeof methods / sizeof methods[0]; i++) {
    godot_method_arg args[2];
    int n = 0, k;
    for (k = 0; k < 2 && methods[i].args[k]; k++, n++) {
      args[k].name = api->godot_string_chars_to_utf8(methods[i].args[k]);
      args[k].type = methods[i].arg_types[k];
      args[k].hint = GODOT_PROPERTY_HINT_NONE;
      args[k].hint_string = api->godot_string_chars_to_utf8("");
    }
    if (n) ns11_api->godot_nativescript_set_method_argument_information(handle, CLASS_NAME,
                                                                        methods[i].name, n, args);
    for (k = 0; k < n; k++) {
      api->godot_string_destroy(&args[k].name);
      api->godot_string_destroy(&args[k].hint_string);
    }
    {
      godot_string doc = api->godot_string_chars_to_utf8(methods[i].doc);
      ns11_api->godot_nativescript_set_method_documentation(handle, CLASS_NAME, methods[i].name,
                                                            doc);
      api->godot_string_destroy(&doc);
    }
  }
}
