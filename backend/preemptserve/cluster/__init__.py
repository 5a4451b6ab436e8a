"""Many engine instances behind one model: moving requests between them (Llumnix)."""
