//! The committed C header is what the code generates, compiles cleanly as C and C++, and lays
//! out every struct as Rust does.
use stable_diffusion::ffi::*;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target").join("ffi-header-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn committed_header_matches_the_code() {
    let generated = std::fs::read_to_string(env!("SD_GENERATED_HEADER"))
        .expect("build.rs did not generate the header (see the cargo warnings)");
    let committed = std::fs::read_to_string(root().join("include/stable_diffusion.h"))
        .expect("include/stable_diffusion.h is missing: run `make header`");
    assert!(
        generated == committed,
        "include/stable_diffusion.h is stale: run `make header` and commit it"
    );
}

fn compile(compiler: &str, args: &[&str]) {
    let out = Command::new(compiler)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_strict_c_and_cpp() {
    let c = scratch("only_header.c");
    std::fs::write(
        &c,
        "#include \"stable_diffusion.h\"\nint main(void) { return 0; }\n",
    )
    .unwrap();
    for std in ["-std=c99", "-std=c11"] {
        compile(
            "cc",
            &[
                std,
                "-Wall",
                "-Wextra",
                "-Wpedantic",
                "-Werror",
                "-fsyntax-only",
                "-Iinclude",
                c.to_str().unwrap(),
            ],
        );
    }
    let cpp = scratch("only_header.cpp");
    std::fs::write(
        &cpp,
        "#include \"stable_diffusion.hpp\"\nint main() { return 0; }\n",
    )
    .unwrap();
    compile(
        "c++",
        &[
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-fsyntax-only",
            "-Iinclude",
            cpp.to_str().unwrap(),
        ],
    );
}

#[test]
fn c_sees_the_same_struct_layout_as_rust() {
    let fields = [
        ("sd_image", "channels"),
        ("sd_load_options", "scheduler"),
        ("sd_generate_params", "guidance"),
        ("sd_generate_params", "paste_back"),
        ("sd_generate_params", "step_user_data"),
        ("sd_step_info", "elapsed_seconds"),
        ("sd_step_info", "latent_width"),
        ("sd_job_progress", "state"),
        ("sd_job_progress", "elapsed_seconds"),
    ];
    let structs = [
        "sd_image",
        "sd_load_options",
        "sd_generate_params",
        "sd_step_info",
        "sd_job_progress",
    ];
    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"stable_diffusion.h\"\nint main(void) {\n",
    );
    for s in structs {
        program += &format!("  printf(\"{s} %zu\\n\", sizeof({s}));\n");
    }
    for (s, f) in fields {
        program += &format!("  printf(\"{s}.{f} %zu\\n\", offsetof({s}, {f}));\n");
    }
    program += "  return 0;\n}\n";
    let src = scratch("layout.c");
    let exe = scratch("layout");
    std::fs::write(&src, program).unwrap();
    compile(
        "cc",
        &[
            "-std=c99",
            "-Iinclude",
            src.to_str().unwrap(),
            "-o",
            exe.to_str().unwrap(),
        ],
    );
    let out = Command::new(&exe).output().unwrap();
    let c_says = String::from_utf8(out.stdout).unwrap();

    let rust_says = [
        format!("sd_image {}", size_of::<sd_image>()),
        format!("sd_load_options {}", size_of::<sd_load_options>()),
        format!("sd_generate_params {}", size_of::<sd_generate_params>()),
        format!("sd_step_info {}", size_of::<sd_step_info>()),
        format!("sd_job_progress {}", size_of::<sd_job_progress>()),
        format!("sd_image.channels {}", offset_of!(sd_image, channels)),
        format!(
            "sd_load_options.scheduler {}",
            offset_of!(sd_load_options, scheduler)
        ),
        format!(
            "sd_generate_params.guidance {}",
            offset_of!(sd_generate_params, guidance)
        ),
        format!(
            "sd_generate_params.paste_back {}",
            offset_of!(sd_generate_params, paste_back)
        ),
        format!(
            "sd_generate_params.step_user_data {}",
            offset_of!(sd_generate_params, step_user_data)
        ),
        format!(
            "sd_step_info.elapsed_seconds {}",
            offset_of!(sd_step_info, elapsed_seconds)
        ),
        format!(
            "sd_step_info.latent_width {}",
            offset_of!(sd_step_info, latent_width)
        ),
        format!(
            "sd_job_progress.state {}",
            offset_of!(sd_job_progress, state)
        ),
        format!(
            "sd_job_progress.elapsed_seconds {}",
            offset_of!(sd_job_progress, elapsed_seconds)
        ),
    ]
    .join("\n")
        + "\n";
    assert_eq!(c_says, rust_says);
}
