# The demo: loads a model on the library's worker thread, generates a texture on the library's worker thread while the scene
# keeps running, shows the step previews, and paints the result onto the floor, whose material
# repeats it 2 x 2 (uv1_scale) to show it tiled.
extends Spatial

signal texture_ready(texture)  # the floor shows a new texture
signal generation_failed(message)  # a load or a generation failed, or was cancelled

const StableDiffusion = preload("res://stable_diffusion/stable_diffusion.gdns")
const SDTexture = preload("res://stable_diffusion/sd_texture.gd")

export var model_path := ""  # "" = $SD_MODEL, else this repository's models/tiny
export var autostart := true  # generate once the model is loaded
export var steps := 20
export var image_size := 64
export var guidance := 5.0
export var first_seed := 42

var sd = null
var loading := false
var busy := false
var next_seed := 0

onready var floor_mesh: MeshInstance = $Floor
onready var prompt_edit: LineEdit = $UI/Panel/Prompt
onready var generate_button: Button = $UI/Panel/Buttons/Generate
onready var cancel_button: Button = $UI/Panel/Buttons/Cancel
onready var status_label: Label = $UI/Panel/Status
onready var preview_rect: TextureRect = $UI/Panel/Preview


func _ready():
	next_seed = first_seed
	generate_button.connect("pressed", self, "generate")
	cancel_button.connect("pressed", self, "cancel")
	sd = StableDiffusion.new()
	var path = resolve_model_path()
	status_label.text = "loading %s" % path
	# Loading runs on a worker thread (seconds for an SD 1.5 model); _process polls it.
	if not sd.load_async(path, {}):
		fail(sd.last_error())
		return
	loading = true


func resolve_model_path() -> String:
	if model_path != "":
		return model_path
	var from_env = OS.get_environment("SD_MODEL")
	if from_env != "":
		return from_env
	# examples/godot/project -> the repository's models/tiny
	return ProjectSettings.globalize_path("res://").plus_file("../../../models/tiny")


func generate():
	if busy or sd == null or not sd.is_loaded():
		return
	var params = {
		"prompt": prompt_edit.text,
		"steps": steps,
		"width": image_size,
		"height": image_size,
		"guidance": guidance,
		"seed": next_seed,
		"seamless": "xy",  # the texture wraps around, so the 2x2 tiling on the plane shows no seam
	}
	next_seed += 1
	if not sd.generate_async(params):  # returns at once
		fail(sd.last_error())
		return
	busy = true
	generate_button.disabled = true
	cancel_button.disabled = false


func cancel():
	if sd != null and sd.cancel():
		status_label.text = "cancelling"


func _process(_delta):
	if loading:
		poll_load()
	if not busy:
		return
	var p = sd.poll()  # never blocks
	if p.has("preview"):
		preview_rect.texture = SDTexture.preview_texture(p["preview"])
	for line in p.get("log", []):
		print("stable diffusion: ", line)
	status_label.text = "%s: step %d/%d, %.1f s" % [p["state_name"], p["step"], p["total"], p["elapsed"]]
	if not p["done"]:
		return
	busy = false
	generate_button.disabled = false
	cancel_button.disabled = true
	if p["status"] != 0:
		fail(p.get("error", p["status_name"]))
		return
	var texture = SDTexture.take_texture(sd)  # repeating, so uv1_scale tiles it
	if texture == null:
		fail(sd.last_error())
		return
	floor_material().albedo_texture = texture
	preview_rect.texture = texture
	status_label.text = "done in %.1f s: the floor shows it 2 x 2" % p["elapsed"]
	print("stable diffusion demo: ", status_label.text)
	emit_signal("texture_ready", texture)


func poll_load():
	var p = sd.poll_load()  # never blocks
	for line in p.get("log", []):
		print("stable diffusion: ", line)
	status_label.text = "loading: %s %d%%" % [p["part"], int(p["fraction"] * 100)]
	if not p["done"]:
		return
	loading = false
	if not p["loaded"]:
		fail(p.get("error", p["status_name"]))
		return
	status_label.text = "loaded in %.1f s" % p["elapsed"]
	if autostart:
		generate()


func floor_material() -> SpatialMaterial:
	return floor_mesh.get_surface_material(0) as SpatialMaterial


func fail(message: String):
	status_label.text = "error: %s" % message
	push_warning("stable diffusion demo: %s" % message)
	emit_signal("generation_failed", message)


func _exit_tree():
	# Frees the load and the job (cancelling them: at most about one step's wait) and the model.
	if sd != null:
		sd.unload()
		sd = null
