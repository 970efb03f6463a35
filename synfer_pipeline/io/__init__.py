"""Storage (versioned, atomic, local or S3), WebDataset shards, image decoding and previews: what every wing reads and writes with."""
