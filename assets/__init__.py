"""The SynFER asset graph: one module per stage; `assets.definitions` assembles the one `Definitions`."""
