"""The paper's maths and the pixel model: noise schedule, the model protocol and U-Net, the MSE and
self-perceptual losses (arXiv 2401.00110, Sec. 3), DDIM sampling with classifier-free guidance."""
