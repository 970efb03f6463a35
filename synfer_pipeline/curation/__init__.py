"""FEText curation (paper Sec. 4.2): dataset readers, ingest, face detection and alignment, super-resolution, the AU
detector, captions and their validation, FEText assembly."""
