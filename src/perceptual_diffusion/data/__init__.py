"""Training data (procedural shapes, Fashion-MNIST, image folders, captioned data) and sample grids."""
