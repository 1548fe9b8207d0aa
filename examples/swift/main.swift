// The C ABI from Swift through module.modulemap (module CStableDiffusion). Not built by the test
// suite: the development machines have no Swift toolchain. Build and run:
//
//   swiftc -I examples/swift -L target/release -Xlinker -rpath -Xlinker target/release \
//       examples/swift/main.swift -o txt2img-swift
//   ./txt2img-swift models/tiny
import CStableDiffusion
import Foundation

struct SDError: Error, CustomStringConvertible {
    let status: sd_status
    let message: String
    var description: String { "\(String(cString: sd_status_string(status))): \(message)" }
}

func check(_ status: sd_status) throws {
    if status != 0 {  // SD_OK
        throw SDError(status: status, message: String(cString: sd_last_error()))
    }
}

/// Owns a pipeline; frees it when the object goes away.
final class Pipeline {
    let handle: OpaquePointer

    init(model: String) throws {
        var p: OpaquePointer?
        try check(sd_pipeline_load(model, nil, &p))
        handle = p!
    }

    deinit { sd_pipeline_free(handle) }

    /// RGB pixels of each generated image. `onStep` returns false to cancel.
    func generate(prompt: String, steps: UInt32, seed: UInt64, size: UInt32,
                  onStep: @escaping (sd_step_info) -> Bool) throws -> [[UInt8]] {
        final class Box { let f: (sd_step_info) -> Bool; init(_ f: @escaping (sd_step_info) -> Bool) { self.f = f } }
        let box = Box(onStep)
        var params = sd_generate_params()
        try check(sd_generate_params_init(&params, MemoryLayout<sd_generate_params>.size))
        params.steps = steps
        params.seed = seed
        params.width = size
        params.height = size
        params.on_step = { info, user in
            let box = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
            return box.f(info!.pointee) ? SD_STEP_CONTINUE : SD_STEP_CANCEL
        }
        var images: OpaquePointer?
        let status: sd_status = prompt.withCString { cPrompt in
            params.prompt = cPrompt
            return withExtendedLifetime(box) {
                params.step_user_data = Unmanaged.passUnretained(box).toOpaque()
                return sd_generate(handle, &params, &images)
            }
        }
        try check(status)
        defer { sd_images_free(images) }
        var count = 0
        try check(sd_images_count(images, &count))
        return try (0..<count).map { i in
            var img: UnsafePointer<sd_image>?
            try check(sd_images_get(images, i, &img))
            let v = img!.pointee
            return Array(UnsafeBufferPointer(start: v.data, count: Int(v.stride * v.height)))
        }
    }
}

let model = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "models/tiny"
print("libstable_diffusion \(String(cString: sd_version())), ABI \(sd_abi_version())")
do {
    let pipe = try Pipeline(model: model)
    let images = try pipe.generate(prompt: "a red circle", steps: 4, seed: 42, size: 32) { info in
        print("step \(info.step)/\(info.total)")
        return true
    }
    print("generated \(images.count) image(s) of \(images[0].count) bytes")
} catch {
    print("error: \(error)")
    exit(1)
}
