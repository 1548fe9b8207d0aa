// C# binding of libstable_diffusion (P/Invoke + SafeHandle), in the shape Unity uses: static
// callbacks marked [MonoPInvokeCallback] that find their target through a GCHandle in the
// user-data pointer (IL2CPP cannot marshal delegates to instance methods). It is the runtime of
// the Unity package unity/com.stablediffusion.runtime (see its README.md), and a plain .NET or
// Mono program compiles it as it is: see examples/csharp/Example.cs.
using System;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;

#if !UNITY_5_3_OR_NEWER
namespace AOT
{
    /// <summary>Unity's marker for methods called from native code; defined here outside Unity.</summary>
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { }
    }
}
#endif

namespace StableDiffusion
{
    public enum Status : int
    {
        Ok = 0, InvalidArgument = 1, Io = 2, BadModel = 3, Unsupported = 4, Cancelled = 5,
        OutOfMemory = 6, Backend = 7, Internal = 8, NotReady = 9,
    }

    public enum JobState : int { Queued = 0, Running = 1, Succeeded = 2, Failed = 3, Cancelled = 4 }
    public enum LogLevel : int { Debug = 0, Info = 1, Warn = 2, Error = 3 }
    public enum DType : int { Fp32 = 0, Fp16 = 1, Bf16 = 2 }

    /// <summary>sd_weights: the kernels float32 models run with on the CPU (Auto: the faster
    /// for the model's family).</summary>
    public enum Weights : int { Auto = 0, Plain = 1, Packed = 2 }

    /// <summary>sd_image: a view of 8-bit pixels owned by whoever made it.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct NativeImage
    {
        public IntPtr Data;
        public uint Width, Height, Stride, Channels;
    }

    /// <summary>sd_step_info.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct StepInfo
    {
        public UIntPtr StructSize;
        public uint Step, Total;
        public double Timestep, ElapsedSeconds;
        public uint Batch, LatentChannels, LatentHeight, LatentWidth;
    }

    /// <summary>sd_job_progress.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct JobProgress
    {
        public UIntPtr StructSize;
        public JobState State;
        public uint Step, Total;
        public double ElapsedSeconds;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct LoadOptionsNative
    {
        public UIntPtr StructSize;
        public IntPtr Device;
        public int DType;
        public IntPtr Scheduler;
        public IntPtr ConfigDir;
        public int UseEma, CopyWeights, PlainWeights;
        public IntPtr LoraDir, EmbeddingsDir, TinyVae;
        public IntPtr OnProgress, ProgressUserData, LogFn, LogUserData;
        public uint NumThreads;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct LoraWeightNative
    {
        public IntPtr Lora;
        public double Weight;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct GenerateParamsNative
    {
        public UIntPtr StructSize;
        public IntPtr Prompt, NegativePrompt;
        public uint Steps, Batch, Width, Height;
        public double Guidance;
        public ulong Seed;
        public double Strength, Eta;
        public uint ClipSkip, OutputChannels;
        public IntPtr Scheduler, InitImage, Mask;
        public int PasteBack;
        public IntPtr OnStep, StepUserData;
        public uint CacheInterval, CacheBranch;
        public double TokenMerging;
        public int Int8Linear;
        public IntPtr Prompt2, NegativePrompt2;
        public uint OriginalWidth, OriginalHeight, CropLeft, CropTop, TargetWidth, TargetHeight;
        public double GuidanceRescale, AestheticScore, NegativeAestheticScore;
        public IntPtr Refiner;
        public double RefinerStart;
        public int PromptSyntax;
        public IntPtr Loras;
        public UIntPtr LoraCount;
        public int Seamless, VaeTiling;
        public uint VaeTileSize;
        public int TinyVaeDecode;
        public uint JobPreviewEvery;
    }

    /// <summary>sd_prompt_syntax: how prompts are read.</summary>
    public enum PromptSyntax : int { Plain = 0, A1111 = 1 }

    /// <summary>sd_seamless: the axes along which an image wraps around (a tileable texture).</summary>
    public enum Seamless : int { None = 0, X = 1, Y = 2, XY = 3 }

    /// <summary>sd_vae_tiling: when the VAE works in tiles.</summary>
    public enum VaeTiling : int { Auto = 0, On = 1, Off = 2 }

    public enum Family : int { Unknown = 0, Sd1 = 1, Sd2 = 2, Sdxl = 3, SdxlRefiner = 4 }
    public enum Prediction : int { Epsilon = 0, V = 1, Sample = 2 }
    public enum DeviceType : int { Cpu = 0, Cuda = 1, Mps = 2 }

    /// <summary>sd_pipeline_info: what a pipeline loaded.</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct PipelineInfoNative
    {
        public UIntPtr StructSize;
        public Family Family;
        public uint NativeWidth, NativeHeight;
        public Prediction PredictionType;
        public uint UnetInChannels, LatentChannels, VaeScaleFactor;
        public int MaxClipSkip;
        public IntPtr DefaultScheduler;
        public DType DType;
        public DeviceType DeviceType;
        public int DeviceIndex;
    }

    /// <summary>What a pipeline loaded, to adapt a UI to it.</summary>
    public sealed class PipelineInfo
    {
        public Family Family;
        public uint NativeWidth, NativeHeight, UnetInChannels, LatentChannels, VaeScaleFactor;
        public Prediction PredictionType;
        /// <summary>The largest clip skip accepted; -1 when unknown.</summary>
        public int MaxClipSkip;
        public string DefaultScheduler;
        public DType DType;
        public DeviceType DeviceType;
        public int DeviceIndex;
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate int StepFn(IntPtr info, IntPtr userData);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void LogFn(LogLevel level, IntPtr message, IntPtr userData);

    internal static class Native
    {
        const string Lib = "stable_diffusion";

        [DllImport(Lib)] public static extern uint sd_abi_version();
        [DllImport(Lib)] public static extern IntPtr sd_version();
        [DllImport(Lib)] public static extern IntPtr sd_last_error();
        [DllImport(Lib)] public static extern IntPtr sd_status_string(int status);
        [DllImport(Lib)] public static extern Status sd_load_options_init(ref LoadOptionsNative o, UIntPtr size);
        [DllImport(Lib)] public static extern Status sd_generate_params_init(ref GenerateParamsNative p, UIntPtr size);
        [DllImport(Lib)] public static extern Status sd_pipeline_load(byte[] path, ref LoadOptionsNative o, out PipelineHandle p);
        [DllImport(Lib)] public static extern void sd_pipeline_free(IntPtr p);
        [DllImport(Lib)] public static extern Status sd_pipeline_set_log_callback(PipelineHandle p, IntPtr fn, IntPtr user);
        [DllImport(Lib)] public static extern Status sd_generate(PipelineHandle p, ref GenerateParamsNative g, out ImagesHandle images);
        [DllImport(Lib)] public static extern Status sd_pipeline_get_info(PipelineHandle p, ref PipelineInfoNative info);
        [DllImport(Lib)] public static extern Status sd_step_preview(IntPtr info, uint index, out IntPtr image);
        [DllImport(Lib)] public static extern Status sd_images_count(ImagesHandle images, out UIntPtr count);
        [DllImport(Lib)] public static extern Status sd_images_get(ImagesHandle images, UIntPtr index, out IntPtr image);
        [DllImport(Lib)] public static extern void sd_images_free(IntPtr images);
        [DllImport(Lib)] public static extern Status sd_job_submit(PipelineHandle p, ref GenerateParamsNative g, out JobHandle job);
        [DllImport(Lib)] public static extern Status sd_job_poll(JobHandle job, ref JobProgress progress);
        [DllImport(Lib)] public static extern Status sd_job_cancel(JobHandle job);
        [DllImport(Lib)] public static extern Status sd_job_wait(JobHandle job, long timeoutMs);
        [DllImport(Lib)] public static extern Status sd_job_take_images(JobHandle job, out ImagesHandle images);
        [DllImport(Lib)] public static extern void sd_job_free(IntPtr job);
        [DllImport(Lib)] public static extern Status sd_lora_load(byte[] path, out LoraHandle lora);
        [DllImport(Lib)] public static extern void sd_lora_free(IntPtr lora);

        /// <summary>A NUL-terminated UTF-8 string owned by the library.</summary>
        public static string Utf8ToString(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }

        public static byte[] Utf8(string s) { return Encoding.UTF8.GetBytes(s + "\0"); }
    }

    public sealed class PipelineHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public PipelineHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sd_pipeline_free(handle); return true; }
    }

    public sealed class LoraHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public LoraHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sd_lora_free(handle); return true; }
    }

    /// <summary>A LoRA file read once (sd_lora_load); add it to any call's
    /// `GenerateOptions.Loras` with a weight. The model is never changed.</summary>
    public sealed class Lora : IDisposable
    {
        internal readonly LoraHandle Handle;

        public Lora(string path) { SdException.Check(Native.sd_lora_load(Native.Utf8(path), out Handle)); }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A LoRA of one call with its weight (1: as trained; may be negative).</summary>
    public sealed class LoraWeight
    {
        public Lora Lora;
        public double Weight = 1.0;
    }

    public sealed class JobHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public JobHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sd_job_free(handle); return true; }
    }

    public sealed class ImagesHandle : SafeHandleZeroOrMinusOneIsInvalid
    {
        public ImagesHandle() : base(true) { }
        protected override bool ReleaseHandle() { Native.sd_images_free(handle); return true; }
    }

    /// <summary>A failed call: the status code and the library's message.</summary>
    public sealed class SdException : Exception
    {
        public readonly Status Status;
        public SdException(Status status, string message) : base(message) { Status = status; }

        internal static void Check(Status status)
        {
            if (status != Status.Ok) throw new SdException(status, Library.LastError);
        }
    }

    public static class Library
    {
        public const uint AbiVersion = 1;
        public static uint LoadedAbiVersion { get { return Native.sd_abi_version(); } }
        public static string Version { get { return Native.Utf8ToString(Native.sd_version()); } }
        public static string LastError { get { return Native.Utf8ToString(Native.sd_last_error()); } }
    }

    /// <summary>Pixels copied out of the library: rows of Width * Channels bytes.</summary>
    public sealed class Image
    {
        public int Width, Height, Channels;
        public byte[] Pixels;

        internal static Image CopyFrom(IntPtr native)
        {
            var v = (NativeImage)Marshal.PtrToStructure(native, typeof(NativeImage));
            var img = new Image { Width = (int)v.Width, Height = (int)v.Height, Channels = (int)v.Channels };
            int row = img.Width * img.Channels;
            img.Pixels = new byte[row * img.Height];
            for (int y = 0; y < img.Height; y++)
                Marshal.Copy(new IntPtr(v.Data.ToInt64() + (long)y * v.Stride), img.Pixels, y * row, row);
            return img;
        }

        internal static Image[] TakeAll(ImagesHandle images)
        {
            using (images)
            {
                UIntPtr count;
                SdException.Check(Native.sd_images_count(images, out count));
                var result = new Image[(int)count];
                for (int i = 0; i < result.Length; i++)
                {
                    IntPtr p;
                    SdException.Check(Native.sd_images_get(images, new UIntPtr((uint)i), out p));
                    result[i] = CopyFrom(p);
                }
                return result;
            }
        }
    }

    /// <summary>The step being reported; valid only during the callback.</summary>
    public sealed class Step
    {
        readonly IntPtr info;
        public readonly StepInfo Info;
        internal Step(IntPtr info) { this.info = info; Info = (StepInfo)Marshal.PtrToStructure(info, typeof(StepInfo)); }

        /// <summary>A cheap RGB preview of batch image `index`, at latent resolution.</summary>
        public Image Preview(uint index = 0)
        {
            IntPtr p;
            SdException.Check(Native.sd_step_preview(info, index, out p));
            return Image.CopyFrom(p);
        }
    }

    /// <summary>What to generate; defaults come from sd_generate_params_init.</summary>
    public sealed class GenerateOptions
    {
        public string Prompt = "", NegativePrompt, Scheduler;
        public uint Steps, Batch, Width, Height, ClipSkip, OutputChannels;
        public double Guidance, Strength, Eta;
        public ulong Seed;
        /// <summary>SDXL: the second encoder's prompts (null: the first ones).</summary>
        public string Prompt2, NegativePrompt2;
        public double GuidanceRescale;
        /// <summary>SDXL: a refiner pipeline that finishes the schedule from
        /// `RefinerStart` on (null: none); it must outlive the call or job.</summary>
        public Pipeline Refiner;
        public double RefinerStart;
        /// <summary>Plain (default, as diffusers) or A1111: `(word:1.2)`, `[word]`, `BREAK`,
        /// prompts longer than 75 tokens.</summary>
        public PromptSyntax Syntax;
        /// <summary>A tileable image along these axes (default none).</summary>
        public Seamless Seamless;
        /// <summary>VAE tiling (default auto: above 1536x1536) and its tile side in pixels
        /// (0: the VAE's sample size).</summary>
        public VaeTiling VaeTiling;
        public uint VaeTileSize;
        /// <summary>Decode with the pipeline's tiny autoencoder (`tinyVae` at load).</summary>
        public bool TinyVaeDecode;
        /// <summary>LoRAs applied to this call only.</summary>
        public readonly System.Collections.Generic.List<LoraWeight> Loras =
            new System.Collections.Generic.List<LoraWeight>();

        public GenerateOptions AddLora(Lora lora, double weight = 1.0)
        {
            Loras.Add(new LoraWeight { Lora = lora, Weight = weight });
            return this;
        }

        public GenerateOptions()
        {
            var d = Defaults();
            Steps = d.Steps; Batch = d.Batch; Width = d.Width; Height = d.Height;
            ClipSkip = d.ClipSkip; OutputChannels = d.OutputChannels;
            Guidance = d.Guidance; Strength = d.Strength; Eta = d.Eta; Seed = d.Seed;
            GuidanceRescale = d.GuidanceRescale; RefinerStart = d.RefinerStart;
        }

        static GenerateParamsNative Defaults()
        {
            var p = new GenerateParamsNative();
            SdException.Check(Native.sd_generate_params_init(ref p, new UIntPtr((uint)Marshal.SizeOf(typeof(GenerateParamsNative)))));
            return p;
        }

        /// <summary>Runs `body` with the native struct; its strings live until `body` returns.</summary>
        internal T With<T>(IntPtr onStep, IntPtr user, Func<GenerateParamsNative, T> body)
        {
            var pins = new System.Collections.Generic.List<GCHandle>();
            // Each handle passed down is kept alive (and refused when already disposed) until
            // the native call returns.
            var held = new System.Collections.Generic.List<SafeHandle>();
            Func<SafeHandle, IntPtr> hold = h =>
            {
                bool added = false;
                h.DangerousAddRef(ref added);
                if (added) held.Add(h);
                return h.DangerousGetHandle();
            };
            Func<string, IntPtr> pin = s =>
            {
                if (s == null) return IntPtr.Zero;
                var h = GCHandle.Alloc(Native.Utf8(s), GCHandleType.Pinned);
                pins.Add(h);
                return h.AddrOfPinnedObject();
            };
            try
            {
                var p = Defaults();
                p.Prompt = pin(Prompt); p.NegativePrompt = pin(NegativePrompt); p.Scheduler = pin(Scheduler);
                p.Steps = Steps; p.Batch = Batch; p.Width = Width; p.Height = Height;
                p.ClipSkip = ClipSkip; p.OutputChannels = OutputChannels;
                p.Guidance = Guidance; p.Strength = Strength; p.Eta = Eta; p.Seed = Seed;
                p.OnStep = onStep; p.StepUserData = user;
                p.Prompt2 = pin(Prompt2); p.NegativePrompt2 = pin(NegativePrompt2);
                p.GuidanceRescale = GuidanceRescale; p.RefinerStart = RefinerStart;
                p.PromptSyntax = (int)Syntax;
                p.Seamless = (int)Seamless; p.VaeTiling = (int)VaeTiling;
                p.VaeTileSize = VaeTileSize; p.TinyVaeDecode = TinyVaeDecode ? 1 : 0;
                p.Refiner = Refiner == null ? IntPtr.Zero : hold(Refiner.SafeHandleForCalls);
                if (Loras.Count > 0)
                {
                    var native = new LoraWeightNative[Loras.Count];
                    for (int i = 0; i < native.Length; i++)
                        native[i] = new LoraWeightNative { Lora = hold(Loras[i].Lora.Handle), Weight = Loras[i].Weight };
                    var h = GCHandle.Alloc(native, GCHandleType.Pinned);
                    pins.Add(h);
                    p.Loras = h.AddrOfPinnedObject();
                    p.LoraCount = new UIntPtr((uint)native.Length);
                }
                var result = body(p);
                GC.KeepAlive(Refiner);
                GC.KeepAlive(Loras);
                return result;
            }
            finally
            {
                foreach (var h in pins) h.Free();
                foreach (var h in held) h.DangerousRelease();
            }
        }
    }

    /// <summary>Carries a managed step callback through the C ABI.</summary>
    internal sealed class StepState
    {
        public Func<Step, bool> Callback;
        public Exception Error;
        GCHandle self;

        static readonly StepFn Thunk = OnStep; // one static delegate, never collected
        public static readonly IntPtr ThunkPtr = Marshal.GetFunctionPointerForDelegate(Thunk);

        public IntPtr Pin() { self = GCHandle.Alloc(this); return GCHandle.ToIntPtr(self); }
        public void Unpin() { if (self.IsAllocated) self.Free(); }

        [AOT.MonoPInvokeCallback(typeof(StepFn))]
        static int OnStep(IntPtr info, IntPtr user)
        {
            var state = (StepState)GCHandle.FromIntPtr(user).Target;
            try { return state.Callback(new Step(info)) ? 0 : 1; }
            catch (Exception e) { state.Error = e; return 1; } // never unwind into native code
        }
    }

    /// <summary>A generate call on a worker thread. Dispose cancels it and waits for it.</summary>
    public sealed class Job : IDisposable
    {
        readonly JobHandle handle;
        readonly StepState state;

        internal Job(JobHandle handle, StepState state) { this.handle = handle; this.state = state; }

        public JobProgress Poll()
        {
            var p = new JobProgress { StructSize = new UIntPtr((uint)Marshal.SizeOf(typeof(JobProgress))) };
            SdException.Check(Native.sd_job_poll(handle, ref p));
            return p;
        }

        public void Cancel() { SdException.Check(Native.sd_job_cancel(handle)); }

        /// <summary>True when finished successfully, false on timeout; throws when it failed.</summary>
        public bool Wait(long timeoutMs = -1)
        {
            var status = Native.sd_job_wait(handle, timeoutMs);
            if (status == Status.NotReady) return false;
            Finish(status);
            return true;
        }

        public Image[] TakeImages()
        {
            ImagesHandle images;
            var status = Native.sd_job_take_images(handle, out images);
            Finish(status);
            return Image.TakeAll(images);
        }

        void Finish(Status status)
        {
            if (state != null && state.Error != null) throw state.Error;
            SdException.Check(status);
        }

        public void Dispose()
        {
            handle.Dispose(); // cancels and waits: the callback state is unused afterwards
            if (state != null) state.Unpin();
        }
    }

    /// <summary>A loaded model. Calls on one pipeline are serialised by the library.</summary>
    public sealed class Pipeline : IDisposable
    {
        readonly PipelineHandle handle;
        GCHandle logger;
        readonly System.Collections.Generic.List<GCHandle> retiredLoggers =
            new System.Collections.Generic.List<GCHandle>();

        static readonly LogFn LogThunk = OnLog;
        static readonly IntPtr LogThunkPtr = Marshal.GetFunctionPointerForDelegate(LogThunk);

        public Pipeline(string modelPath, string device = null, DType dtype = DType.Fp32, string scheduler = null,
                        Weights weights = Weights.Auto, string loraDir = null, string embeddingsDir = null,
                        string tinyVae = null, uint numThreads = 0)
        {
            var o = new LoadOptionsNative();
            SdException.Check(Native.sd_load_options_init(ref o, new UIntPtr((uint)Marshal.SizeOf(typeof(LoadOptionsNative)))));
            var dev = device == null ? default(GCHandle) : GCHandle.Alloc(Native.Utf8(device), GCHandleType.Pinned);
            var sch = scheduler == null ? default(GCHandle) : GCHandle.Alloc(Native.Utf8(scheduler), GCHandleType.Pinned);
            var lor = loraDir == null ? default(GCHandle) : GCHandle.Alloc(Native.Utf8(loraDir), GCHandleType.Pinned);
            var emb = embeddingsDir == null ? default(GCHandle) : GCHandle.Alloc(Native.Utf8(embeddingsDir), GCHandleType.Pinned);
            var tiny = tinyVae == null ? default(GCHandle) : GCHandle.Alloc(Native.Utf8(tinyVae), GCHandleType.Pinned);
            try
            {
                if (tiny.IsAllocated) o.TinyVae = tiny.AddrOfPinnedObject();
                if (lor.IsAllocated) o.LoraDir = lor.AddrOfPinnedObject();
                if (emb.IsAllocated) o.EmbeddingsDir = emb.AddrOfPinnedObject();
                if (dev.IsAllocated) o.Device = dev.AddrOfPinnedObject();
                if (sch.IsAllocated) o.Scheduler = sch.AddrOfPinnedObject();
                o.DType = (int)dtype;
                o.PlainWeights = (int)weights;
                o.NumThreads = numThreads;
                SdException.Check(Native.sd_pipeline_load(Native.Utf8(modelPath), ref o, out handle));
            }
            finally
            {
                if (dev.IsAllocated) dev.Free();
                if (sch.IsAllocated) sch.Free();
                if (lor.IsAllocated) lor.Free();
                if (emb.IsAllocated) emb.Free();
                if (tiny.IsAllocated) tiny.Free();
            }
        }

        /// <summary>The handle, for `GenerateOptions.Refiner`: kept alive across a call that
        /// passes it down.</summary>
        internal SafeHandle SafeHandleForCalls { get { return handle; } }

        /// <summary>What was loaded: family, native size, prediction type, channels, clip skip
        /// range, default scheduler, dtype and device.</summary>
        public PipelineInfo Info
        {
            get
            {
                var n = new PipelineInfoNative { StructSize = new UIntPtr((uint)Marshal.SizeOf(typeof(PipelineInfoNative))) };
                SdException.Check(Native.sd_pipeline_get_info(handle, ref n));
                return new PipelineInfo
                {
                    Family = n.Family, NativeWidth = n.NativeWidth, NativeHeight = n.NativeHeight,
                    PredictionType = n.PredictionType, UnetInChannels = n.UnetInChannels,
                    LatentChannels = n.LatentChannels, VaeScaleFactor = n.VaeScaleFactor,
                    MaxClipSkip = n.MaxClipSkip, DefaultScheduler = Native.Utf8ToString(n.DefaultScheduler),
                    DType = n.DType, DeviceType = n.DeviceType, DeviceIndex = n.DeviceIndex,
                };
            }
        }

        [AOT.MonoPInvokeCallback(typeof(LogFn))]
        static void OnLog(LogLevel level, IntPtr message, IntPtr user)
        {
            try { ((Action<LogLevel, string>)GCHandle.FromIntPtr(user).Target)(level, Native.Utf8ToString(message)); }
            catch (Exception) { } // never unwind into native code
        }

        /// <summary>Routes this pipeline's log messages to `log` (may run on worker threads).</summary>
        public void SetLogger(Action<LogLevel, string> log)
        {
            var old = logger;
            logger = log == null ? default(GCHandle) : GCHandle.Alloc(log);
            SdException.Check(Native.sd_pipeline_set_log_callback(handle,
                log == null ? IntPtr.Zero : LogThunkPtr,
                log == null ? IntPtr.Zero : GCHandle.ToIntPtr(logger)));
            // The old logger may still be running on a worker thread: free it with the pipeline.
            if (old.IsAllocated) retiredLoggers.Add(old);
        }

        public Image[] Generate(GenerateOptions options, Func<Step, bool> onStep = null)
        {
            var state = onStep == null ? null : new StepState { Callback = onStep };
            var user = state == null ? IntPtr.Zero : state.Pin();
            try
            {
                ImagesHandle images = null;
                var status = options.With(state == null ? IntPtr.Zero : StepState.ThunkPtr, user,
                    p => Native.sd_generate(handle, ref p, out images));
                if (state != null && state.Error != null) throw state.Error;
                SdException.Check(status);
                return Image.TakeAll(images);
            }
            finally
            {
                if (state != null) state.Unpin();
            }
        }

        /// <summary>Starts a job at once; `onStep` runs on the job's worker thread.</summary>
        public Job Submit(GenerateOptions options, Func<Step, bool> onStep = null)
        {
            var state = onStep == null ? null : new StepState { Callback = onStep };
            var user = state == null ? IntPtr.Zero : state.Pin();
            JobHandle job = null;
            var status = options.With(state == null ? IntPtr.Zero : StepState.ThunkPtr, user,
                p => Native.sd_job_submit(handle, ref p, out job));
            if (status != Status.Ok && state != null) state.Unpin();
            SdException.Check(status);
            return new Job(job, state);
        }

        public void Dispose()
        {
            handle.Dispose(); // cancels this pipeline's jobs; no log callback runs afterwards
            if (logger.IsAllocated) logger.Free();
            foreach (var h in retiredLoggers) h.Free();
            retiredLoggers.Clear();
        }
    }
}
