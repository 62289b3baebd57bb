"""Client-side training (`local`) and held-out evaluation (`evaluate`)."""
