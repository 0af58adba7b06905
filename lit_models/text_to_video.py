"""Text-to-video: the diffusion module conditioned on a text encoder, the default paradigm.

`TextToVideo` is `DiffusionModule` itself (`lit_models/diffusion.py`); the name stays for the
code and the run configs written before paradigms became objectives of one module.
"""

from lit_models.diffusion import DiffusionModule

TextToVideo = DiffusionModule
