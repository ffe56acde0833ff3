"""What differs between devices, behind one object chosen when an engine starts (base.py)."""
