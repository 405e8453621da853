"""The four actors of the pipeline: intake → router → chunker → broadcaster."""
