# Textures from StableDiffusion's Images (Godot 3.x).
#
#     const SDTexture = preload("res://stable_diffusion/sd_texture.gd")
#     var texture = SDTexture.take_texture(sd)       # after poll() said "succeeded"
#     material.albedo_texture = texture               # repeats: set uv1_scale to tile it
extends Reference


# An ImageTexture of image: mipmapped and filtered, and repeating so that a material's UV
# scale tiles it. null for a null or empty image.
static func to_texture(image: Image, repeat: bool = true, filter: bool = true) -> ImageTexture:
	if image == null or image.is_empty():
		return null
	var flags = Texture.FLAG_MIPMAPS
	if repeat:
		flags |= Texture.FLAG_REPEAT
	if filter:
		flags |= Texture.FLAG_FILTER
	var texture = ImageTexture.new()
	texture.create_from_image(image, flags)
	return texture


# The finished job's first image as a texture; null when there is none (sd.last_error() says
# why: not finished, failed, cancelled, already taken).
static func take_texture(sd, repeat: bool = true) -> ImageTexture:
	var image = sd.take_image()
	if image == null:
		return null
	return to_texture(image, repeat)


# A preview from poll()["preview"]: it is at latent resolution (an eighth of the image's
# width and height), so it is shown unfiltered, as blocks.
static func preview_texture(image: Image) -> ImageTexture:
	return to_texture(image, false, false)
