"""Drivers: every way of getting audio in and out of the engine (sound card, MIDI, files)."""
