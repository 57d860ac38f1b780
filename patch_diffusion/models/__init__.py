"""Networks of EDM in Flax Linen (NHWC): DDPM++ / NCSN++ (``SongUNet``) and ADM (``DhariwalUNet``)."""
from patch_diffusion.models.dhariwal_unet import DhariwalUNet
from patch_diffusion.models.registry import (abstract_variables, create_model, init_params,
                                             resolve_model_kwargs)
from patch_diffusion.models.song_unet import SongUNet

__all__ = ["DhariwalUNet", "SongUNet", "abstract_variables", "create_model", "init_params",
           "resolve_model_kwargs"]
