"""Using SAE concepts: steering CLIP and LLaVA by editing latents inside the vision tower.

    with steered(clip, "visual.transformer.resblocks.2", sae, {417: 3.0}, max_activations=maxima):
        image_embedding = clip.encode_image(pixels)       # latent 417 set to 3x its maximum

Jobs, the HTTP API and notebooks all steer through `steered` (`vlsae_ray.steer.hook`).
"""

from vlsae_ray.steer.hook import ABLATE, MODES, TOKENS, Edit, steer_rows, steered

__all__ = ["ABLATE", "MODES", "TOKENS", "Edit", "steer_rows", "steered"]
