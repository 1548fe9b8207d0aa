// Texture Generator: a model loaded off the main thread, one job polled every frame, each step's
// preview and then the final image shown in a Texture2D, with a tileable (seamless) toggle.
//
// Threads:
// - Loading runs on a thread-pool Task started in Start (seconds for a full-size model); Update
//   picks the pipeline up when the task has finished. The main thread never waits for it.
// - Generation is a job (Pipeline.Submit): it runs on the library's worker thread. The step
//   callback runs there too: it copies the preview (valid only inside the callback) into a
//   Color32 buffer under a lock and touches no Unity API. Update polls the job without blocking
//   and uploads the newest buffer into the Texture2D on the main thread.
// - OnDisable cancels the job (returns at once); OnDestroy disposes the job (waits at most about
//   one step for its worker), the pipeline and the textures.
using System;
using System.Threading.Tasks;
using UnityEngine;
using SdImage = StableDiffusion.Image;

namespace StableDiffusion.Samples
{
    public sealed class TextureGenerator : MonoBehaviour
    {
        [Header("Model")]
        [Tooltip("A diffusers folder or a single .safetensors / .ckpt file (absolute, or relative to the working directory: the project folder in the editor).")]
        public string modelPath = "";
        [Tooltip("cpu, cuda, cuda:1 or mps; empty: cpu.")]
        public string device = "";
        [Tooltip("Send the library's log messages to the Console.")]
        public bool logToConsole = true;

        [Header("Generation")]
        public string prompt = "a red circle on a white background";
        public string negativePrompt = "";
        [Tooltip("Pixels, a multiple of 8; 0: the model's native size.")]
        public int width = 0;
        [Tooltip("Pixels, a multiple of 8; 0: the model's native size.")]
        public int height = 0;
        public int steps = 20;
        [Tooltip("Classifier-free guidance; 0: the library's default (7.5).")]
        public float guidance = 0f;
        public int seed = 42;
        [Tooltip("A tileable texture: the image wraps around on both axes (GenerateOptions.Seamless = XY). Drawn 2 x 2 on screen so that the seams show, or do not.")]
        public bool tileable = true;
        [Tooltip("Generate as soon as the model is loaded; otherwise call Generate() (also in this component's context menu).")]
        public bool generateOnStart = true;

        [Header("Display")]
        [Tooltip("Optional: a renderer (a Quad, a Plane) whose material shows the texture.")]
        public Renderer target;
        [Tooltip("Draw the status line and the texture on screen (OnGUI).")]
        public bool drawOnScreen = true;

        /// <summary>The latest preview or the final image; null before the first step.</summary>
        public Texture2D OutputTexture { get { return texture; } }
        /// <summary>What is happening, for a UI.</summary>
        public string StatusText { get; private set; }

        Task<Pipeline> loading;
        Pipeline pipeline;
        Job job;
        bool generatePending;
        Texture2D texture;
        Material targetMaterial;

        // Written by the step callback on the job's worker thread, read by Update: guarded by
        // previewLock. previewVersion counts the buffers written; shownVersion the last uploaded.
        readonly object previewLock = new object();
        Color32[] previewPixels;
        int previewWidth, previewHeight, previewVersion, shownVersion;
        // Set on the main thread, read by the step callback: stop at the next step.
        volatile bool stopRequested;

        void Start()
        {
            if (string.IsNullOrEmpty(modelPath))
            {
                StatusText = "set Model Path on the Texture Generator";
                Debug.LogError("TextureGenerator: no model path", this);
                return;
            }
            // Copies for the loading thread: it touches nothing of this component.
            string path = modelPath;
            string dev = string.IsNullOrEmpty(device) ? null : device;
            StatusText = "loading " + path;
            loading = Task.Run(() => new Pipeline(path, dev));
            generatePending = generateOnStart;
        }

        void Update()
        {
            if (loading != null && loading.IsCompleted) FinishLoading();
            if (pipeline != null && generatePending && job == null)
            {
                generatePending = false;
                Submit();
            }
            if (job != null) PollJob();
        }

        /// <summary>Starts a generation with the current fields (after loading, when still loading).</summary>
        [ContextMenu("Generate")]
        public void Generate()
        {
            if (job != null)
            {
                Debug.LogWarning("TextureGenerator: a generation is already running", this);
                return;
            }
            if (pipeline == null) { generatePending = true; return; }
            Submit();
        }

        /// <summary>Stops the running generation within about one step.</summary>
        [ContextMenu("Cancel")]
        public void Cancel()
        {
            stopRequested = true;
            if (job != null) job.Cancel();
        }

        void FinishLoading()
        {
            var task = loading;
            loading = null;
            if (task.Status != TaskStatus.RanToCompletion)
            {
                Exception e = task.Exception != null ? task.Exception.GetBaseException() : new OperationCanceledException();
                StatusText = "load failed: " + e.Message;
                Debug.LogException(e, this);
                generatePending = false;
                return;
            }
            pipeline = task.Result;
            if (logToConsole) pipeline.SetLogger(Log);
            var info = pipeline.Info;
            StatusText = "loaded " + info.Family + ", native " + info.NativeWidth + "x" + info.NativeHeight;
        }

        void Submit()
        {
            var options = new GenerateOptions
            {
                Prompt = prompt ?? "",
                NegativePrompt = string.IsNullOrEmpty(negativePrompt) ? null : negativePrompt,
                Width = (uint)Math.Max(0, width),
                Height = (uint)Math.Max(0, height),
                Steps = (uint)Math.Max(1, steps),
                Seed = (ulong)(uint)seed,
                Seamless = tileable ? Seamless.XY : Seamless.None,
            };
            if (guidance > 0f) options.Guidance = guidance;
            lock (previewLock)
            {
                previewPixels = null;
                shownVersion = previewVersion;
            }
            stopRequested = false;
            try
            {
                job = pipeline.Submit(options, OnStep);
                StatusText = "queued";
            }
            catch (SdException e)
            {
                // Refused at once (a size that is not a multiple of 8, too many steps, ...).
                StatusText = "refused: " + e.Message;
                Debug.LogError("TextureGenerator: " + e.Status + ": " + e.Message, this);
            }
        }

        // On the job's worker thread. No Unity API here: copy, publish under the lock, return.
        bool OnStep(Step step)
        {
            if (stopRequested) return false;
            SdImage preview;
            try
            {
                preview = step.Preview(0); // copied out: the library's pointer dies with this call
            }
            catch (SdException)
            {
                return true; // no preview for this model (latents that are not 4-channel): go on
            }
            var pixels = ToColors(preview);
            lock (previewLock)
            {
                previewPixels = pixels;
                previewWidth = preview.Width;
                previewHeight = preview.Height;
                previewVersion++;
            }
            return !stopRequested;
        }

        void PollJob()
        {
            var progress = job.Poll();
            Color32[] pixels = null;
            int w = 0, h = 0;
            lock (previewLock)
            {
                if (previewVersion != shownVersion && previewPixels != null)
                {
                    pixels = previewPixels;
                    w = previewWidth;
                    h = previewHeight;
                    shownVersion = previewVersion;
                }
            }
            if (pixels != null) Show(pixels, w, h);

            switch (progress.State)
            {
                case JobState.Queued:
                    StatusText = "queued";
                    break;
                case JobState.Running:
                    StatusText = "step " + progress.Step + "/" + progress.Total + ", " + progress.ElapsedSeconds.ToString("F1") + " s";
                    break;
                default:
                    Finish(progress);
                    break;
            }
        }

        void Finish(JobProgress progress)
        {
            var finished = job;
            job = null;
            try
            {
                // Throws the job's error when it failed or was cancelled, or the step callback's
                // own exception.
                var images = finished.TakeImages();
                var image = images[0];
                Show(ToColors(image), image.Width, image.Height);
                StatusText = "done: " + image.Width + "x" + image.Height + " in " + progress.ElapsedSeconds.ToString("F1") + " s" + (tileable ? ", tileable" : "");
            }
            catch (SdException e)
            {
                StatusText = e.Status == Status.Cancelled ? "cancelled" : "failed: " + e.Message;
                if (e.Status != Status.Cancelled) Debug.LogError("TextureGenerator: " + e.Status + ": " + e.Message, this);
            }
            catch (Exception e)
            {
                StatusText = "failed: " + e.Message;
                Debug.LogException(e, this);
            }
            finally
            {
                finished.Dispose(); // finished already: returns at once
            }
        }

        // Main thread only: textures are Unity objects.
        void Show(Color32[] pixels, int w, int h)
        {
            if (texture == null || texture.width != w || texture.height != h)
            {
                if (texture != null) Destroy(texture);
                texture = new Texture2D(w, h, TextureFormat.RGBA32, false);
                texture.name = "Stable Diffusion";
                if (target != null)
                {
                    if (targetMaterial == null) targetMaterial = target.material; // the renderer's own instance
                    targetMaterial.mainTexture = texture;
                }
            }
            texture.wrapMode = tileable ? TextureWrapMode.Repeat : TextureWrapMode.Clamp;
            // Previews without a tiny autoencoder are 1/8 of the image's size: keep them blocky.
            texture.filterMode = w < 64 ? FilterMode.Point : FilterMode.Bilinear;
            texture.SetPixels32(pixels);
            texture.Apply();
        }

        // The library's rows run top to bottom, a Texture2D's bottom to top.
        static Color32[] ToColors(SdImage image)
        {
            int w = image.Width, h = image.Height, c = image.Channels;
            var colors = new Color32[w * h];
            for (int y = 0; y < h; y++)
            {
                int src = y * w * c, dst = (h - 1 - y) * w;
                for (int x = 0; x < w; x++, src += c)
                {
                    byte r = image.Pixels[src];
                    byte g = c >= 3 ? image.Pixels[src + 1] : r;
                    byte b = c >= 3 ? image.Pixels[src + 2] : r;
                    byte a = c == 4 ? image.Pixels[src + 3] : (byte)255;
                    colors[dst + x] = new Color32(r, g, b, a);
                }
            }
            return colors;
        }

        // On whichever thread the library logs from; Debug.Log may be called from any thread.
        static void Log(LogLevel level, string message)
        {
            if (level == LogLevel.Error) Debug.LogError("[stable_diffusion] " + message);
            else if (level == LogLevel.Warn) Debug.LogWarning("[stable_diffusion] " + message);
            else Debug.Log("[stable_diffusion] " + level + ": " + message);
        }

        void OnGUI()
        {
            if (!drawOnScreen) return;
            GUI.Label(new Rect(10, 10, 800, 24), StatusText ?? "");
            if (texture == null) return;
            var rect = new Rect(10, 40, 512, 512);
            if (tileable) GUI.DrawTextureWithTexCoords(rect, texture, new Rect(0, 0, 2, 2));
            else GUI.DrawTexture(rect, texture);
        }

        void OnDisable()
        {
            // Returns at once; the worker stops within about one step. The job is released by
            // Update when the component is enabled again, or by OnDestroy.
            Cancel();
        }

        void OnDestroy()
        {
            if (job != null)
            {
                job.Dispose(); // cancels if needed and waits for its worker: no callback runs afterwards
                job = null;
            }
            if (pipeline != null)
            {
                pipeline.Dispose();
                pipeline = null;
            }
            if (loading != null)
            {
                // Still loading: release the pipeline when it arrives.
                loading.ContinueWith(t => { if (t.Status == TaskStatus.RanToCompletion) t.Result.Dispose(); });
                loading = null;
            }
            if (texture != null) Destroy(texture);
            if (targetMaterial != null) Destroy(targetMaterial);
        }
    }
}
