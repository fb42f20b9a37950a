//! `ferrotap img`: qemu-img's verbs on the image layer (placeholder until the CLI lands).
