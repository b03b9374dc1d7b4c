"""The format seam: raw and qcow2 (cow) volumes."""
