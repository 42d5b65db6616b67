"""Ray Serve application: OpenAI-compatible ingress -> encoder -> router head -> targets."""
