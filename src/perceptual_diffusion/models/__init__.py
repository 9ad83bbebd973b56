"""Model families beyond the pixel U-Net and their files: latent text-to-image models, diffusers export and
import, one load_model for every kind of path."""
