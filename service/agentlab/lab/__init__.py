"""Lab backends: whatever really runs the prompt, behind one small interface."""
