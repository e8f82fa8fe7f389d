"""Using SAE concepts: steering CLIP and LLaVA by editing latents inside the vision tower.

    with steered(clip, "visual.transformer.resblocks.2", sae, {417: 3.0}, max_activations=maxima):
        image_embedding = clip.encode_image(pixels)       # latent 417 set to 3x its maximum

Jobs, the HTTP API and notebooks all steer through `steered` (`vlsae_ray.steer.hook`).
`generate_mitigated` (`vlsae_ray.steer.hallucination`) decodes a LLaVA with its text concepts mixed
toward the image's through an aligner and a VL-SAE, against hallucination.
"""

from vlsae_ray.steer.hallucination import generate_mitigated
from vlsae_ray.steer.hook import ABLATE, MODES, TOKENS, Edit, steer_rows, steered

__all__ = ["ABLATE", "MODES", "TOKENS", "Edit", "generate_mitigated", "steer_rows", "steered"]
