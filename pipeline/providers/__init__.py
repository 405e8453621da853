"""Text-to-speech providers behind one interface (see `base.Provider`)."""
