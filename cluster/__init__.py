"""Operating the system: local Ray clusters, job submission, the end-to-end demo."""
