"""Where the images come from and how they are kept: sources, the uint8 store, prep's resize, the partition."""
