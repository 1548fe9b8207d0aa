//! Embeds an rpath to libtorch's lib folder into every binary, test, example and the shared
//! library, so that nothing needs LD_LIBRARY_PATH at run time; compiles the small C++ part
//! (`csrc/`); generates the C header.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let target = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
        if target == "linux" || target == "macos" {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        }
    }
    compile_cpu_kernels();
    generate_header();
}

/// Compiles `csrc/` (libtorch operators tch does not bind: the quantized linear layers and
/// oneDNN's packed-weight convolutions and linear layers) against libtorch's headers, with the
/// flags torch-sys builds its own C++ with.
fn compile_cpu_kernels() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    };
    let include = std::path::Path::new(&lib_dir).join("..").join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .file("csrc/int8_linear.cpp")
        .file("csrc/packed_weights.cpp")
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("sd_cpu_kernels");
}

/// Writes the C header for `src/ffi/` (cbindgen, settings in cbindgen.toml) to
/// `$OUT_DIR/stable_diffusion.h`, whose path the crate sees as `SD_GENERATED_HEADER` (the
/// header test compares it with the committed `include/stable_diffusion.h`). With
/// `SD_UPDATE_HEADER=1` (`make header`) it also rewrites the committed copy.
fn generate_header() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=SD_UPDATE_HEADER");
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    let generated = out_dir.join("stable_diffusion.h");
    println!(
        "cargo:rustc-env=SD_GENERATED_HEADER={}",
        generated.display()
    );
    let config = match cbindgen::Config::from_file(root.join("cbindgen.toml")) {
        Ok(config) => config,
        Err(e) => return println!("cargo:warning=cbindgen.toml: {e}"),
    };
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src").join("ffi").join("mod.rs"))
        .generate();
    match bindings {
        Ok(bindings) => {
            bindings.write_to_file(&generated);
            if std::env::var("SD_UPDATE_HEADER").is_ok_and(|v| v == "1") {
                bindings.write_to_file(root.join("include").join("stable_diffusion.h"));
            }
        }
        // A syntax error in src/ffi/ is better reported by rustc than here.
        Err(e) => println!("cargo:warning=cbindgen could not generate the C header: {e}"),
    }
}
