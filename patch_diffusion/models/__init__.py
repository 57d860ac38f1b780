"""Networks of EDM in Flax Linen (NHWC): DDPM++ / NCSN++ (``SongUNet``), ADM (``DhariwalUNet``) and the
multi-stage multi-decoder U-Net (``MultistageUNet``)."""
from patch_diffusion.models.dhariwal_unet import DhariwalUNet
from patch_diffusion.models.multistage_unet import MultistageUNet, stage_of_sigma
from patch_diffusion.models.registry import (abstract_variables, create_model, init_params,
                                             resolve_model_kwargs)
from patch_diffusion.models.song_unet import SongUNet

__all__ = ["DhariwalUNet", "MultistageUNet", "SongUNet", "abstract_variables", "create_model",
           "init_params", "resolve_model_kwargs", "stage_of_sigma"]
