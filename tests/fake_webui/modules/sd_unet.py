"""modules.sd_unet: ``current_unet`` is set when a TensorRT (or other) UNet replaces the torch one."""
current_unet = None
