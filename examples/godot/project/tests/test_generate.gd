# Headless test of the StableDiffusion GDNative class, run by scripts/test-godot.sh:
#
#     SD_MODEL=models/tiny SD_GODOT_OUT=/tmp/out \
#         godot3-server --path examples/godot/project -s res://tests/test_generate.gd
#
# Loads the model (also on a worker thread, polled, cancelled), generates asynchronously while this (main) thread keeps running frames,
# checks progress, previews and log lines, saves the image as PNG and reads it back, runs image
# to image with a mask that needs converting, cancels a run, checks the refusals (bad model
# path, bad options and parameters, a second job while one runs), runs the demo scene, and
# checks that no library handle outlives its object. Prints `godot: N passed, M failed` and
# exits 0 only when all passed; a phase that does not finish in time (a script error stops
# the coroutine) makes the watchdog exit with 2.
extends SceneTree

const StableDiffusion = preload("res://stable_diffusion/stable_diffusion.gdns")
const SDTexture = preload("res://stable_diffusion/sd_texture.gd")

const STATE_RUNNING = 1
const STATE_SUCCEEDED = 2
const STATE_CANCELLED = 4
const SD_ERR_CANCELLED = 5

var passed := 0
var failed := 0
var phase_name := ""
var phase_deadline := 0
var finished := false
var model := ""
var out_dir := ""
var demo_result = null


func _initialize():
	model = OS.get_environment("SD_MODEL")
	out_dir = OS.get_environment("SD_GODOT_OUT")
	if model == "":
		model = ProjectSettings.globalize_path("res://").plus_file("../../../models/tiny")
	if out_dir == "":
		out_dir = OS.get_user_data_dir()
	print("godot-test: Godot %s, model %s, output in %s" % [Engine.get_version_info()["string"], model, out_dir])
	_watchdog()
	_run()


# A phase must finish within its seconds; a script error stops _run, and this ends the test.
func phase(name: String, seconds: float):
	phase_name = name
	phase_deadline = OS.get_ticks_msec() + int(seconds * 1000)
	print("godot-test: -- %s" % name)


func _watchdog():
	while not finished:
		yield(create_timer(0.25), "timeout")
		if not finished and OS.get_ticks_msec() > phase_deadline:
			print("godot-test: FAILED: phase '%s' did not finish in time (or a script error stopped it)" % phase_name)
			print("godot: %d passed, %d failed" % [passed, failed + 1])
			finished = true
			quit(2)


func check(ok: bool, what: String):
	if ok:
		passed += 1
		print("godot-test: ok: %s" % what)
	else:
		failed += 1
		print("godot-test: FAILED: %s" % what)


# Polls once a frame until the job is done (a coroutine: yield on its "completed"). Returns
# {last, polls, running_with_progress, previews, preview_size, log, max_gap_ms}.
func poll_until_done(sd):
	var r = {"polls": 0, "running_with_progress": 0, "previews": 0, "preview_size": Vector2(),
		"log": [], "max_gap_ms": 0, "last": {}}
	# Yield before the first poll, so that the caller always gets a coroutine to wait on.
	yield(self, "idle_frame")
	var last_frame = OS.get_ticks_msec()
	while true:
		var p = sd.poll()
		r["polls"] += 1
		r["last"] = p
		if p["state"] == STATE_RUNNING and p["step"] > 0 and p["step"] < p["total"]:
			r["running_with_progress"] += 1
		if p.has("preview"):
			r["previews"] += 1
			r["preview_size"] = p["preview"].get_size()
		r["log"] += p.get("log", [])
		if p["done"]:
			return r
		yield(self, "idle_frame")
		var now = OS.get_ticks_msec()
		r["max_gap_ms"] = max(r["max_gap_ms"], now - last_frame)
		last_frame = now


# Polls the async load once a frame until done (a coroutine). Returns {last, polls,
# fraction_never_fell, max_gap_ms, log}.
func poll_load_until_done(sd):
	var r = {"polls": 0, "fraction_never_fell": true, "max_gap_ms": 0, "last": {}, "log": []}
	yield(self, "idle_frame")
	var last_frame = OS.get_ticks_msec()
	var fraction = 0.0
	while true:
		var p = sd.poll_load()
		r["polls"] += 1
		r["last"] = p
		if p["fraction"] < fraction:
			r["fraction_never_fell"] = false
		fraction = p["fraction"]
		r["log"] += p.get("log", [])
		if p["done"]:
			return r
		yield(self, "idle_frame")
		var now = OS.get_ticks_msec()
		r["max_gap_ms"] = max(r["max_gap_ms"], now - last_frame)
		last_frame = now


# Mean and spread of an image's luminance, and its distinct grey levels.
func luminance_stats(image: Image) -> Dictionary:
	var sum = 0.0
	var sum_sq = 0.0
	var levels = {}
	image.lock()
	for y in image.get_height():
		for x in image.get_width():
			var c = image.get_pixel(x, y)
			var l = 0.299 * c.r + 0.587 * c.g + 0.114 * c.b
			sum += l
			sum_sq += l * l
			levels[int(l * 255.0)] = true
	image.unlock()
	var n = image.get_width() * image.get_height()
	var mean = sum / n
	return {"mean": mean, "std": sqrt(max(sum_sq / n - mean * mean, 0.0)), "levels": levels.size()}


func _run():
	# Let _initialize return first, so that the main loop runs the frames this test yields on.
	yield(self, "idle_frame")
	var started = OS.get_ticks_msec()

	phase("refusals without a model", 20)
	var sd = StableDiffusion.new()
	print("godot-test: %s" % sd.version())
	check(sd.live_handles()["pipelines"] == 0, "no pipeline before load")
	check(not sd.load("no/such/model", {}), "load('no/such/model') == false")
	check(sd.last_error() != "", "last_error() after the bad path: '%s'" % sd.last_error())
	check(not sd.is_loaded(), "nothing is loaded after the bad path")
	check(not sd.load(model, {"dtype": "fp64"}) and "dtype" in sd.last_error(), "bad dtype refused: '%s'" % sd.last_error())
	check(not sd.load(model, {"devise": "cpu"}) and "devise" in sd.last_error(), "unknown option refused: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x"}) and sd.last_error() != "", "generate_async without a model refused: '%s'" % sd.last_error())
	check(sd.take_image() == null and sd.last_error() != "", "take_image without a job: null, '%s'" % sd.last_error())
	check(sd.poll()["state_name"] == "idle", "poll() without a job says idle")

	phase("load", 30)
	var t = OS.get_ticks_msec()
	var loaded = sd.load(model, {})
	check(loaded, "load(%s) in %d ms %s" % [model, OS.get_ticks_msec() - t, sd.last_error()])
	if not loaded:
		return finish()
	check(sd.last_error() == "", "last_error() is empty after a success")
	var info = sd.get_info()
	print("godot-test: info %s" % info)
	check(info.get("native_width", 0) > 0 and info.get("vae_scale_factor", 0) > 0, "get_info() has the native size")
	check(not sd.load(model, {"use_ema": "yes"}) and sd.is_loaded(), "a load with a bad option is refused and keeps the model: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x", "width": 17}) and "width" in sd.last_error(), "width 17 refused at once: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": 3}) and "prompt" in sd.last_error(), "a prompt that is not a String refused: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x", "stepz": 3}) and "stepz" in sd.last_error(), "unknown parameter refused: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x", "seamless": "z"}) and "seamless" in sd.last_error(), "an unknown seamless axis refused: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x", "seamless": "xy", "vae_tiling": "on"}) and "seamless" in sd.last_error(), "seamless with VAE tiling on refused: '%s'" % sd.last_error())
	check(not sd.generate_async({"prompt": "x", "init_image": "nope"}) and "init_image" in sd.last_error(), "init_image that is not an Image refused: '%s'" % sd.last_error())

	phase("text to image, polled every frame", 60)
	var params = {"prompt": "a red circle on a white background", "negative_prompt": "blurry",
		"width": 64, "height": 64, "steps": 20, "guidance": 5.0, "seed": 42, "scheduler": "ddim"}
	t = OS.get_ticks_msec()
	check(sd.generate_async(params), "generate_async returned at once (%d ms) %s" % [OS.get_ticks_msec() - t, sd.last_error()])
	check(not sd.generate_async(params) and "running" in sd.last_error(), "a second job while one runs is refused: '%s'" % sd.last_error())
	var r = yield(poll_until_done(sd), "completed")
	var last = r["last"]
	print("godot-test: %d polls in %d ms; last poll %s" % [r["polls"], OS.get_ticks_msec() - t, last])
	check(last["state"] == STATE_SUCCEEDED and last["status"] == 0, "the job succeeded")
	check(last["step"] == 20 and last["total"] == 20, "20 of 20 steps done")
	check(r["running_with_progress"] > 0, "%d polls showed the job running between its first and last step" % r["running_with_progress"])
	check(r["polls"] > 20, "the main thread ran %d frames during the run" % r["polls"])
	check(r["max_gap_ms"] < 1000, "the longest frame during the run took %d ms" % r["max_gap_ms"])
	var latent = 64 / info["vae_scale_factor"]
	check(r["previews"] > 0 and r["preview_size"] == Vector2(latent, latent), "%d previews of %s (latent size %d)" % [r["previews"], r["preview_size"], latent])
	check(r["log"].size() > 0, "the library's log reached poll(): %s" % [r["log"]])

	var image = sd.take_image()
	check(image is Image, "take_image() gives an Image")
	if not (image is Image):
		return finish()
	check(image.get_size() == Vector2(64, 64) and image.get_format() == Image.FORMAT_RGB8, "the image is 64x64 RGB8 (%s, format %d)" % [image.get_size(), image.get_format()])
	var stats = luminance_stats(image)
	print("godot-test: luminance %s" % stats)
	check(stats["std"] > 0.02 and stats["levels"] > 8, "the image is not blank (std %.3f, %d grey levels)" % [stats["std"], stats["levels"]])
	var png = out_dir.plus_file("godot_txt2img.png")
	check(image.save_png(png) == OK, "saved %s" % png)
	var reread = Image.new()
	check(reread.load(png) == OK and reread.get_size() == Vector2(64, 64), "read back %s: %s" % [png, reread.get_size()])
	check(luminance_stats(reread)["levels"] == stats["levels"], "the PNG holds the same pixels")
	check(sd.take_image() == null and sd.last_error() != "", "a second take_image() gives null: '%s'" % sd.last_error())
	var texture = SDTexture.to_texture(image)
	check(texture is ImageTexture and texture.get_width() == 64 and texture.flags & Texture.FLAG_REPEAT, "SDTexture.to_texture gives a repeating 64x64 ImageTexture")
	check(SDTexture.take_texture(sd) == null, "SDTexture.take_texture gives null once the image is taken")

	phase("image to image with a converted mask", 60)
	var mask = Image.new()
	mask.create(64, 64, false, Image.FORMAT_LA8)  # converted to RGBA8 by the plugin
	mask.lock()
	for y in 64:
		for x in 64:
			mask.set_pixel(x, y, Color(1, 1, 1, 1) if x < 32 else Color(0, 0, 0, 1))  # repaint the left half
	mask.unlock()
	var edit = {"prompt": "a blue square on a white background", "init_image": image, "mask": mask,
		"strength": 0.75, "steps": 8, "seed": 7, "guidance": 5.0, "output_channels": 4}
	check(sd.generate_async(edit), "generate_async with init_image and mask %s" % sd.last_error())
	r = yield(poll_until_done(sd), "completed")
	check(r["last"]["state"] == STATE_SUCCEEDED, "the inpainting job succeeded (%s)" % r["last"].get("error", ""))
	var images = sd.take_images()
	check(images is Array and images.size() == 1, "take_images() gives one image")
	if images is Array and images.size() == 1:
		var edited = images[0]
		check(edited.get_size() == Vector2(64, 64) and edited.get_format() == Image.FORMAT_RGBA8, "the inpainted image is 64x64 RGBA8")
		edited.save_png(out_dir.plus_file("godot_inpaint.png"))

	phase("cancel", 60)
	check(sd.generate_async({"prompt": "a green triangle", "steps": 200, "seed": 3}), "a 200-step job started")
	var seen_running = false
	while true:
		var p = sd.poll()
		if p["done"] or (p["state"] == STATE_RUNNING and p["step"] >= 1):
			seen_running = p["state"] == STATE_RUNNING
			break
		yield(self, "idle_frame")
	check(seen_running, "the job was running before cancel()")
	t = OS.get_ticks_msec()
	check(sd.cancel(), "cancel() == true while it runs")
	r = yield(poll_until_done(sd), "completed")
	last = r["last"]
	print("godot-test: after cancel(): %s (%d ms)" % [last, OS.get_ticks_msec() - t])
	check(last["state"] == STATE_CANCELLED and last["state_name"] == "cancelled", "the job ended cancelled")
	check(last["status"] == SD_ERR_CANCELLED and last["status_name"] == "cancelled", "its status is SD_ERR_CANCELLED")
	check(last["step"] < 200, "it stopped at step %d of 200" % last["step"])
	check(sd.take_image() == null and "cancel" in sd.last_error(), "take_image() after cancel: null, '%s'" % sd.last_error())
	check(not sd.cancel(), "cancel() on a finished job == false")

	phase("demo scene", 60)
	var demo = load("res://demo/demo.tscn").instance()
	demo.model_path = model
	demo.connect("texture_ready", self, "_on_demo", [true])
	demo.connect("generation_failed", self, "_on_demo", [false])
	root.add_child(demo)
	while demo_result == null:
		yield(self, "idle_frame")
	check(demo_result[1], "the demo generated a texture %s" % [demo_result[0]])
	var material = demo.floor_material()
	check(material.albedo_texture is ImageTexture and material.albedo_texture.get_width() == demo.image_size, "the demo's floor shows it")
	check(material.uv1_scale == Vector3(2, 2, 1) and material.albedo_texture.flags & Texture.FLAG_REPEAT, "tiled 2 x 2 with a repeating texture")
	demo.queue_free()
	yield(self, "idle_frame")
	yield(self, "idle_frame")

	phase("async load", 60)
	var loader = StableDiffusion.new()
	check(loader.poll_load()["state_name"] == "idle", "poll_load() without a load says idle")
	check(not loader.cancel_load(), "cancel_load() without a load == false")
	check(not loader.load_async(model, {"dtype": "fp64"}) and "dtype" in loader.last_error(), "load_async with a bad dtype refused at once: '%s'" % loader.last_error())
	check(loader.load_async("no/such/model", {}), "load_async of a bad path starts")
	var lp = yield(poll_load_until_done(loader), "completed")
	check(not lp["last"]["loaded"] and "no/such/model" in lp["last"].get("error", "") and not loader.is_loaded(), "and ends with an error naming it: '%s'" % lp["last"].get("error", ""))
	check(loader.poll_load()["state_name"] == "idle", "a finished load is reported once, then idle")
	check(loader.load_async(model, {}), "load_async returned at once %s" % loader.last_error())
	check(loader.cancel_load(), "cancel_load() == true while it loads")
	lp = yield(poll_load_until_done(loader), "completed")
	check(lp["last"]["state_name"] == "cancelled" and lp["last"]["status_name"] == "cancelled" and not lp["last"]["loaded"] and not loader.is_loaded(), "the load ended cancelled, nothing loaded: %s" % lp["last"])
	t = OS.get_ticks_msec()
	check(loader.load_async(model, {}), "a load after the cancelled one starts")
	check(not loader.load_async(model, {}) and "running" in loader.last_error(), "a second load while one runs is refused: '%s'" % loader.last_error())
	lp = yield(poll_load_until_done(loader), "completed")
	print("godot-test: async load: %d polls in %d ms; last %s" % [lp["polls"], OS.get_ticks_msec() - t, lp["last"]])
	check(lp["last"]["loaded"] and lp["last"]["status"] == 0 and loader.is_loaded(), "the async load succeeded and the model is in place")
	check(lp["last"]["bytes_total"] > 0 and lp["last"]["bytes_done"] == lp["last"]["bytes_total"] and lp["last"]["fraction"] == 1.0, "all %d bytes read" % lp["last"]["bytes_total"])
	check(lp["fraction_never_fell"], "the fraction never went back")
	check(lp["log"].size() > 0, "the load's log reached poll_load(): %s" % [lp["log"]])
	check(lp["max_gap_ms"] < 1000, "the longest frame during the load took %d ms" % lp["max_gap_ms"])
	check(loader.get_info().get("native_width", 0) > 0, "get_info() of the loaded model")
	check(loader.generate_async({"prompt": "a red circle", "width": 32, "height": 32, "steps": 2}), "the loaded model generates %s" % loader.last_error())
	r = yield(poll_until_done(loader), "completed")
	check(r["last"]["state"] == STATE_SUCCEEDED and loader.take_image() is Image, "an image from the async-loaded model")
	check(loader.load_async(model, {}), "a load into an instance with a model starts")
	check(loader.is_loaded(), "the old model stays usable while the new one loads")
	loader.unload()
	check(loader.live_handles()["load_jobs"] == 0 and not loader.is_loaded(), "unload() during a load frees the load job: %s" % loader.live_handles())
	check(loader.load_async(model, {}), "a load started and then the instance dropped")
	var instances = sd.live_handles()["instances"]
	loader = null  # the destructor cancels the load and waits for its worker
	# The finished coroutines that were given `loader` let go of it by the next frames.
	for _i in 3:
		yield(self, "idle_frame")
	var after = sd.live_handles()
	check(after["instances"] == instances - 1 and after["load_jobs"] == 0, "dropping an instance during a load freed its load job: %s" % after)

	phase("nothing outlives its object", 30)
	sd.unload()
	var live = sd.live_handles()
	check(live["pipelines"] == 0 and live["jobs"] == 0 and live["load_jobs"] == 0 and live["images"] == 0, "unload() freed everything: %s" % live)
	var other = StableDiffusion.new()
	check(other.load(model, {}), "a second instance loads")
	check(other.generate_async({"prompt": "x", "steps": 500}), "and starts a 500-step job")
	var other_state = {}
	while true:
		yield(self, "idle_frame")
		other_state = other.poll()
		if other_state["done"] or other_state["step"] >= 1:
			break
	check(other_state["state"] == STATE_RUNNING, "the job is running (step %d of %d)" % [other_state["step"], other_state["total"]])
	t = OS.get_ticks_msec()
	other = null  # the last reference: the destructor cancels the job and waits for it
	var free_ms = OS.get_ticks_msec() - t
	live = sd.live_handles()
	check(live["pipelines"] == 0 and live["jobs"] == 0 and live["instances"] == 1, "dropping an instance with a running job freed it in %d ms: %s" % [free_ms, live])
	sd = null
	print("godot-test: done in %.1f s" % ((OS.get_ticks_msec() - started) / 1000.0))
	finish()


func _on_demo(arg, ok):
	demo_result = [arg, ok]


func finish():
	finished = true
	print("godot: %d passed, %d failed" % [passed, failed])
	quit(0 if failed == 0 else 1)
