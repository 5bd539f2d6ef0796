"""Pure building blocks: discretizations, scans, the diagonal LTI engine and the model interface."""
