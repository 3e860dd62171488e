"""Face photo collections: readers, teacher labels, protocol splits, the leak guard and training samples."""
