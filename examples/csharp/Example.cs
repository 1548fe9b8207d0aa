// The C ABI from C# through the binding StableDiffusion.cs (the Unity package's runtime,
// unity/com.stablediffusion.runtime/Runtime/): load, generate with a progress callback and a
// preview, write a PPM, poll a job as a game loop would, cancel another. Exits non-zero when
// anything does not behave as documented, so the test suite runs it as a check.
//
//     mcs -out:example.exe ../../unity/com.stablediffusion.runtime/Runtime/StableDiffusion.cs Example.cs
//     LD_LIBRARY_PATH=path/to/lib mono example.exe models/tiny out.ppm [LORA_MODEL LORA_FILE]
//
// With LORA_MODEL and LORA_FILE (a LoRA made for that model) it also applies the LoRA per call.
using System;
using System.IO;
using System.Threading;
using StableDiffusion;

static class Example
{
    static int failures;

    static void Expect(bool ok, string what)
    {
        if (ok) return;
        Console.Error.WriteLine("FAILED: " + what);
        failures++;
    }

    static void WritePpm(string path, Image img)
    {
        using (var f = File.Create(path))
        {
            var header = System.Text.Encoding.ASCII.GetBytes("P6\n" + img.Width + " " + img.Height + "\n255\n");
            f.Write(header, 0, header.Length);
            for (int i = 0; i < img.Width * img.Height; i++)
                f.Write(img.Pixels, i * img.Channels, 3);
        }
    }

    static int Main(string[] args)
    {
        string model = args.Length > 0 ? args[0] : "models/tiny";
        string outPath = args.Length > 1 ? args[1] : "txt2img-csharp.ppm";
        Console.WriteLine("libstable_diffusion " + Library.Version + ", ABI " + Library.LoadedAbiVersion);
        Expect(Library.LoadedAbiVersion == Library.AbiVersion, "ABI version");

        try
        {
            new Pipeline("no/such/model").Dispose();
            Expect(false, "a missing model must throw");
        }
        catch (SdException e)
        {
            Expect(e.Status == Status.Io, "missing model gives Status.Io");
            Console.WriteLine("expected failure: " + e.Message);
        }

        try
        {
            new Pipeline(model, weights: (Weights)7).Dispose();
            Expect(false, "an unknown weights value must throw");
        }
        catch (SdException e)
        {
            Expect(e.Status == Status.InvalidArgument && e.Message.Contains("plain_weights is 7"), "unknown weights value is named");
        }

        using (var pipe = new Pipeline(model, weights: Weights.Packed))
        {
            int logs = 0;
            pipe.SetLogger((level, message) => { Interlocked.Increment(ref logs); Console.Error.WriteLine("[sd " + level + "] " + message); });
            var info = pipe.Info;
            Console.WriteLine("family " + info.Family + ", native " + info.NativeWidth + "x" + info.NativeHeight + ", scheduler " + info.DefaultScheduler);
            Expect(info.Family == Family.Sd1 && info.UnetInChannels == 4 && info.NativeWidth > 0 && info.DefaultScheduler.Length > 0, "pipeline info");

            var options = new GenerateOptions { Prompt = "a red circle on a white background", Steps = 4, Seed = 42, Width = 32, Height = 32 };
            int steps = 0, previewWidth = 0;
            var images = pipe.Generate(options, step =>
            {
                steps++;
                previewWidth = step.Preview(0).Width;
                return true;
            });
            Expect(images.Length == 1 && images[0].Width == 32 && images[0].Height == 32 && images[0].Channels == 3, "one 32x32 RGB image");
            WritePpm(outPath, images[0]);
            Console.WriteLine("wrote " + outPath);
            Expect(steps == 4 && previewWidth > 0, "four steps with previews");
            Expect(logs > 0, "log messages");

            // Prompts as A1111 reads them: the same text with a weight and BREAK is another image.
            var weighted = new GenerateOptions { Prompt = "a (red:1.4) circle BREAK on a [white] background", Steps = 4, Seed = 42, Width = 32, Height = 32, Syntax = PromptSyntax.A1111 };
            var a1111 = pipe.Generate(weighted)[0].Pixels;
            weighted.Syntax = PromptSyntax.Plain;
            var plain = pipe.Generate(weighted)[0].Pixels;
            Expect(a1111.Length == plain.Length && !System.Linq.Enumerable.SequenceEqual(a1111, plain), "A1111 syntax changes the image");

            // A bad argument: an exception with the code and the library's message.
            try
            {
                pipe.Generate(new GenerateOptions { Prompt = "x", Width = 33 });
                Expect(false, "width 33 must throw");
            }
            catch (SdException e)
            {
                Expect(e.Status == Status.InvalidArgument && e.Message.Contains("width"), "width 33 gives InvalidArgument");
            }

            // An exception thrown in the callback cancels the run and comes back out.
            try
            {
                pipe.Generate(options, step => { throw new InvalidOperationException("boom"); });
                Expect(false, "the callback's exception must propagate");
            }
            catch (InvalidOperationException e)
            {
                Expect(e.Message == "boom", "the callback's own exception");
            }

            // A game loop: submit, then poll once per frame without blocking.
            using (var job = pipe.Submit(options))
            {
                int frames = 0;
                while (!job.Wait(0))
                {
                    var p = job.Poll();
                    Expect(p.Step <= 4, "progress in range");
                    frames++;
                    Thread.Sleep(2); // render a frame
                }
                Console.WriteLine("job finished after " + frames + " frames");
                Expect(job.TakeImages().Length == 1, "job images");
            }

            // Cancel from another thread while it runs.
            options.Steps = 200;
            var started = new ManualResetEvent(false);
            using (var job = pipe.Submit(options, step => { started.Set(); return true; }))
            {
                var canceller = new Thread(() => { started.WaitOne(); job.Cancel(); });
                canceller.Start();
                canceller.Join();
                try
                {
                    job.Wait();
                    Expect(false, "a cancelled job must throw");
                }
                catch (SdException e)
                {
                    Expect(e.Status == Status.Cancelled, "Status.Cancelled");
                    Expect(job.Poll().State == JobState.Cancelled, "JobState.Cancelled");
                }
            }
        }

        // A LoRA per call: read once, applied to the calls that ask for it; a call without it
        // gives the image of before.
        if (args.Length > 3)
        {
            using (var basePipe = new Pipeline(args[2]))
            using (var lora = new Lora(args[3]))
            {
                var plain = new GenerateOptions { Prompt = "a red circle", Steps = 2, Width = 32, Height = 32 };
                var styled = new GenerateOptions { Prompt = "a red circle", Steps = 2, Width = 32, Height = 32 }.AddLora(lora, 0.8);
                var before = basePipe.Generate(plain)[0].Pixels;
                var with = basePipe.Generate(styled)[0].Pixels;
                var after = basePipe.Generate(plain)[0].Pixels;
                Expect(!System.Linq.Enumerable.SequenceEqual(before, with), "the LoRA changes the image");
                Expect(System.Linq.Enumerable.SequenceEqual(before, after), "without it, the image of before");
            }
            try
            {
                new Lora("no/such/lora.safetensors").Dispose();
                Expect(false, "a missing LoRA must throw");
            }
            catch (SdException e)
            {
                Expect(e.Status == Status.Io, "missing LoRA gives Status.Io");
            }
            Console.WriteLine("LoRA: applied per call");
        }

        if (failures > 0)
        {
            Console.Error.WriteLine(failures + " check(s) failed");
            return 1;
        }
        Console.WriteLine("csharp example: ok");
        return 0;
    }
}
