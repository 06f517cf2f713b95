"""The review web app (``defectops review``): candidates beside the champion, approve/reject, the audit trail."""
