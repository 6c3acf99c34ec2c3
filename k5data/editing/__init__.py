"""Image-editing pair mining (report §4.3, Table 1): candidate pairs of curated images found through nearest-neighbour
indexes over CLIP / DINOv2 embeddings, geometric verification, the Table 1 keep/drop rules and instruction captions.
See docs/editing.md ("Mining")."""
