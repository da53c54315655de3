"""Names of the explanation methods, importable without torch (the gateway checks them)."""

IMAGE_METHODS = ("swag_i", "swag_g", "swag_i_g", "jitter_cam", "grad_cam")
VIDEO_METHODS = ("swag_v_i", "swag_v_g", "swag_v_i_g", "grad_cam")
METHODS = ("swag_i", "swag_g", "swag_i_g", "swag_v_i", "swag_v_g", "swag_v_i_g", "jitter_cam", "grad_cam")
DEFAULT_METHODS = {"image": ("swag_i_g", "jitter_cam"), "video": ("swag_v_i_g",)}
