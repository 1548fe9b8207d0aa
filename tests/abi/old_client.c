/*
 * A program written and compiled against an older header still works with this library: built
 * twice by scripts/test-clients.sh, once against tests/abi/before-sdxl/stable_diffusion.h (the
 * header before the SDXL fields were appended to sd_generate_params and sd_pipeline_info was
 * added) and once against the current one. Both builds must load the model, generate the same
 * bytes (the appended fields take their defaults when struct_size says they are absent) and
 * job-submit the same request.
 *
 *     old_client MODEL OUT.rgb   (prints sizeof(sd_generate_params) as compiled)
 */
#include "stable_diffusion.h"

#include <stdio.h>

int main(int argc, char **argv) {
  sd_pipeline *pipe = NULL;
  sd_generate_params p;
  sd_images *images = NULL;
  sd_job *job = NULL;
  const sd_image *image = NULL;
  FILE *out;
  unsigned y;
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL OUT.rgb\n", argv[0]);
    return 2;
  }
  printf("sizeof(sd_generate_params) %u\n", (unsigned)sizeof(sd_generate_params));
  if (sd_abi_version() != SD_ABI_VERSION ||
      sd_pipeline_load(argv[1], NULL, &pipe) != SD_OK ||
      sd_generate_params_init(&p, sizeof p) != SD_OK) {
    fprintf(stderr, "setup failed: %s\n", sd_last_error());
    return 1;
  }
  p.prompt = "a red circle on a white background";
  p.steps = 3;
  p.width = p.height = 32;
  p.seed = 7;
  if (sd_generate(pipe, &p, &images) != SD_OK || sd_images_get(images, 0, &image) != SD_OK) {
    fprintf(stderr, "generate failed: %s\n", sd_last_error());
    return 1;
  }
  out = fopen(argv[2], "wb");
  if (!out) return 1;
  for (y = 0; y < image->height; y++) {
    fwrite(image->data + (size_t)y * image->stride, 1, (size_t)image->width * image->channels,
           out);
  }
  fclose(out);
  sd_images_free(images);
  /* The job path reads the same struct. */
  if (sd_job_submit(pipe, &p, &job) != SD_OK || sd_job_wait(job, -1) != SD_OK) {
    fprintf(stderr, "job failed: %s\n", sd_last_error());
    return 1;
  }
  sd_job_free(job);
  sd_pipeline_free(pipe);
  return 0;
}
