"""Names of the explanation methods, and what the gateway asks of them, importable without torch."""

IMAGE_METHODS = ("swag_i", "swag_g", "swag_i_g", "jitter_cam", "grad_cam")
VIDEO_METHODS = ("swag_v_i", "swag_v_g", "swag_v_i_g", "grad_cam")
METHODS = ("swag_i", "swag_g", "swag_i_g", "swag_v_i", "swag_v_g", "swag_v_i_g", "jitter_cam", "grad_cam")
DEFAULT_METHODS = {"image": ("swag_i_g", "jitter_cam"), "video": ("swag_v_i_g",)}
# Surprise suppression (thesis 6.4.1): the most superpixels of a region deleted one at a time.
# The thesis sweeps 1-100 of 100-400; of the region's 50, ten is a fifth of the input.
SUPPRESSION_STEPS = 10
