"""storage: the only code that talks to object stores (S3, local folders) and to SQL."""
