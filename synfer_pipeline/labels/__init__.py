"""Labels for synthetic images: FERAnno and label voting."""
