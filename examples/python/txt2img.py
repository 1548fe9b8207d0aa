#!/usr/bin/env python3
"""The C ABI from Python with ctypes (standard library only).

    python3 examples/python/txt2img.py [--lib path/to/libstable_diffusion.so] MODEL OUT.ppm \
        [LORA_MODEL LORA_FILE]

Loads a model, generates with a progress callback and a preview, writes a PPM, runs a job
polled without blocking, cancels another, and checks the error codes; with LORA_MODEL and
LORA_FILE (a LoRA made for that model) it also applies the LoRA per call. Exits non-zero when
anything does not behave as documented, so the test suite runs it as a check.
"""
import argparse
import ctypes as C
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# sd_status
SD_OK, SD_ERR_INVALID_ARGUMENT, SD_ERR_IO = 0, 1, 2
SD_ERR_CANCELLED, SD_NOT_READY = 5, 9
# sd_job_state
SD_JOB_QUEUED, SD_JOB_RUNNING, SD_JOB_SUCCEEDED = 0, 1, 2
SD_STEP_CONTINUE, SD_STEP_CANCEL = 0, 1
SD_ABI_VERSION = 1


class Image(C.Structure):
    _fields_ = [("data", C.POINTER(C.c_uint8)), ("width", C.c_uint32), ("height", C.c_uint32),
                ("stride", C.c_uint32), ("channels", C.c_uint32)]


class StepInfo(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("step", C.c_uint32), ("total", C.c_uint32),
                ("timestep", C.c_double), ("elapsed_seconds", C.c_double),
                ("batch", C.c_uint32), ("latent_channels", C.c_uint32),
                ("latent_height", C.c_uint32), ("latent_width", C.c_uint32)]


STEP_FN = C.CFUNCTYPE(C.c_int32, C.POINTER(StepInfo), C.c_void_p)
LOG_FN = C.CFUNCTYPE(None, C.c_int32, C.c_char_p, C.c_void_p)


class LoraWeight(C.Structure):
    _fields_ = [("lora", C.c_void_p), ("weight", C.c_double)]


class GenerateParams(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("prompt", C.c_char_p),
                ("negative_prompt", C.c_char_p), ("steps", C.c_uint32), ("batch", C.c_uint32),
                ("width", C.c_uint32), ("height", C.c_uint32), ("guidance", C.c_double),
                ("seed", C.c_uint64), ("strength", C.c_double), ("eta", C.c_double),
                ("clip_skip", C.c_uint32), ("output_channels", C.c_uint32),
                ("scheduler", C.c_char_p), ("init_image", C.POINTER(Image)),
                ("mask", C.POINTER(Image)), ("paste_back", C.c_int32), ("on_step", STEP_FN),
                ("step_user_data", C.c_void_p),
                ("cache_interval", C.c_uint32), ("cache_branch", C.c_uint32),
                ("token_merging", C.c_double), ("int8_linear", C.c_int32),
                ("prompt_2", C.c_char_p), ("negative_prompt_2", C.c_char_p),
                ("original_width", C.c_uint32), ("original_height", C.c_uint32),
                ("crop_left", C.c_uint32), ("crop_top", C.c_uint32),
                ("target_width", C.c_uint32), ("target_height", C.c_uint32),
                ("guidance_rescale", C.c_double), ("aesthetic_score", C.c_double),
                ("negative_aesthetic_score", C.c_double), ("refiner", C.c_void_p),
                ("refiner_start", C.c_double), ("prompt_syntax", C.c_int32),
                ("loras", C.POINTER(LoraWeight)), ("lora_count", C.c_size_t),
                ("seamless", C.c_int32), ("vae_tiling", C.c_int32),
                ("vae_tile_size", C.c_uint32), ("tiny_vae_decode", C.c_int32)]


class JobProgress(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("state", C.c_int32), ("step", C.c_uint32),
                ("total", C.c_uint32), ("elapsed_seconds", C.c_double)]


def find_library(explicit):
    candidates = [explicit, os.environ.get("SD_LIBRARY"),
                  os.path.join(ROOT, "target", "debug", "libstable_diffusion.so"),
                  os.path.join(ROOT, "target", "release", "libstable_diffusion.so")]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return "libstable_diffusion.so"  # the loader's search path (e.g. after make install)


def bind(path):
    lib = C.CDLL(path)
    P = C.c_void_p
    signatures = {
        "sd_abi_version": (C.c_uint32, []),
        "sd_version": (C.c_char_p, []),
        "sd_last_error": (C.c_char_p, []),
        "sd_status_string": (C.c_char_p, [C.c_int32]),
        "sd_generate_params_init": (C.c_int32, [C.POINTER(GenerateParams), C.c_size_t]),
        "sd_pipeline_load": (C.c_int32, [C.c_char_p, P, C.POINTER(P)]),
        "sd_pipeline_free": (None, [P]),
        "sd_pipeline_set_log_callback": (C.c_int32, [P, LOG_FN, P]),
        "sd_generate": (C.c_int32, [P, C.POINTER(GenerateParams), C.POINTER(P)]),
        "sd_step_preview": (C.c_int32, [C.POINTER(StepInfo), C.c_uint32,
                                        C.POINTER(C.POINTER(Image))]),
        "sd_images_count": (C.c_int32, [P, C.POINTER(C.c_size_t)]),
        "sd_images_get": (C.c_int32, [P, C.c_size_t, C.POINTER(C.POINTER(Image))]),
        "sd_images_free": (None, [P]),
        "sd_job_submit": (C.c_int32, [P, C.POINTER(GenerateParams), C.POINTER(P)]),
        "sd_job_poll": (C.c_int32, [P, C.POINTER(JobProgress)]),
        "sd_job_cancel": (C.c_int32, [P]),
        "sd_job_wait": (C.c_int32, [P, C.c_int64]),
        "sd_job_take_images": (C.c_int32, [P, C.POINTER(P)]),
        "sd_job_free": (None, [P]),
        "sd_lora_load": (C.c_int32, [C.c_char_p, C.POINTER(P)]),
        "sd_lora_free": (None, [P]),
    }
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class SdError(Exception):
    def __init__(self, lib, status):
        self.status = status
        super().__init__(f"{lib.sd_status_string(status).decode()}: "
                         f"{lib.sd_last_error().decode()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib")
    ap.add_argument("model", nargs="?", default=os.path.join(ROOT, "models/tiny"))
    ap.add_argument("out", nargs="?", default="txt2img-python.ppm")
    ap.add_argument("lora_model", nargs="?")
    ap.add_argument("lora_file", nargs="?")
    args = ap.parse_args()
    lib = bind(find_library(args.lib))
    failures = []

    def expect(ok, what):
        if not ok:
            failures.append(what)
            print("FAILED:", what, "-", lib.sd_last_error().decode(), file=sys.stderr)

    def check(status):
        if status != SD_OK:
            raise SdError(lib, status)

    print(f"libstable_diffusion {lib.sd_version().decode()}, ABI {lib.sd_abi_version()}")
    expect(lib.sd_abi_version() == SD_ABI_VERSION, "ABI version")

    pipe = C.c_void_p()
    status = lib.sd_pipeline_load(b"no/such/model", None, C.byref(pipe))
    expect(status == SD_ERR_IO and not pipe, "missing model gives SD_ERR_IO")
    check(lib.sd_pipeline_load(args.model.encode(), None, C.byref(pipe)))

    logs = []
    log_cb = LOG_FN(lambda level, message, _: logs.append((level, message.decode())))
    check(lib.sd_pipeline_set_log_callback(pipe, log_cb, None))

    params = GenerateParams()
    check(lib.sd_generate_params_init(C.byref(params), C.sizeof(params)))
    images = C.c_void_p()
    status = lib.sd_generate(pipe, C.byref(params), C.byref(images))  # no prompt
    expect(status == SD_ERR_INVALID_ARGUMENT and b"prompt" in lib.sd_last_error(),
           "NULL prompt gives SD_ERR_INVALID_ARGUMENT naming it")
    params.prompt = "a red circle on a white background".encode()  # UTF-8
    params.steps, params.seed, params.width, params.height = 4, 42, 32, 32

    seen = []

    def on_step(info_ptr, _user):
        info = info_ptr.contents
        preview = C.POINTER(Image)()
        ok = lib.sd_step_preview(info_ptr, 0, C.byref(preview)) == SD_OK
        seen.append((info.step, info.total, preview.contents.width if ok else 0))
        return SD_STEP_CONTINUE

    step_cb = STEP_FN(on_step)  # keep a reference while the library may call it
    params.on_step = step_cb
    check(lib.sd_generate(pipe, C.byref(params), C.byref(images)))
    count = C.c_size_t()
    check(lib.sd_images_count(images, C.byref(count)))
    img = C.POINTER(Image)()
    check(lib.sd_images_get(images, 0, C.byref(img)))
    im = img.contents
    expect((count.value, im.width, im.height, im.channels, im.stride) == (1, 32, 32, 3, 96),
           "one 32x32 RGB image")
    data = C.string_at(im.data, im.stride * im.height)
    with open(args.out, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (im.width, im.height))
        for y in range(im.height):
            f.write(data[y * im.stride:y * im.stride + im.width * 3])
    lib.sd_images_free(images)
    print("wrote", args.out)
    expect([s[:2] for s in seen] == [(i, 4) for i in range(1, 5)], f"steps seen: {seen}")
    expect(all(s[2] > 0 for s in seen), "previews")
    expect(any("txt2img" in m for _, m in logs), f"log messages: {logs}")

    # A job polled without blocking, then one cancelled.
    params.on_step = STEP_FN()  # NULL
    job = C.c_void_p()
    check(lib.sd_job_submit(pipe, C.byref(params), C.byref(job)))
    progress = JobProgress(struct_size=C.sizeof(JobProgress))
    while True:
        check(lib.sd_job_poll(job, C.byref(progress)))
        if progress.state not in (SD_JOB_QUEUED, SD_JOB_RUNNING):
            break
        time.sleep(0.002)
    expect(progress.state == SD_JOB_SUCCEEDED and progress.step == 4, "job finished")
    check(lib.sd_job_take_images(job, C.byref(images)))
    lib.sd_images_free(images)
    lib.sd_job_free(job)

    params.steps = 200
    check(lib.sd_job_submit(pipe, C.byref(params), C.byref(job)))
    check(lib.sd_job_cancel(job))
    expect(lib.sd_job_wait(job, -1) == SD_ERR_CANCELLED, "cancelled job")
    lib.sd_job_free(job)
    lib.sd_pipeline_free(pipe)

    if args.lora_file:
        # A LoRA per call: read once, applied to the calls that ask for it; a call without it
        # gives the image of before.
        base, lora = C.c_void_p(), C.c_void_p()
        check(lib.sd_pipeline_load(args.lora_model.encode(), None, C.byref(base)))
        check(lib.sd_lora_load(args.lora_file.encode(), C.byref(lora)))
        p = GenerateParams()
        check(lib.sd_generate_params_init(C.byref(p), C.sizeof(p)))
        p.prompt, p.steps, p.width, p.height = b"a red circle", 2, 32, 32

        def render(params):
            out = C.c_void_p()
            check(lib.sd_generate(base, C.byref(params), C.byref(out)))
            first = C.POINTER(Image)()
            check(lib.sd_images_get(out, 0, C.byref(first)))
            pixels = C.string_at(first.contents.data, first.contents.stride * first.contents.height)
            lib.sd_images_free(out)
            return pixels

        before = render(p)
        weights = (LoraWeight * 1)(LoraWeight(lora, 0.8))
        p.loras, p.lora_count = weights, 1
        styled = render(p)
        p.loras, p.lora_count = None, 0
        expect(styled != before, "the LoRA changes the image")
        expect(render(p) == before, "without it, the image of before")
        missing = C.c_void_p()
        status = lib.sd_lora_load(b"no/such/lora.safetensors", C.byref(missing))
        expect(status == SD_ERR_IO and not missing, "missing LoRA gives SD_ERR_IO")
        lib.sd_lora_free(lora)
        lib.sd_pipeline_free(base)
        print("LoRA: applied per call")

    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("python example: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
