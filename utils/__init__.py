"""Small helpers at the bottom of the project: errors, config handling, crash-safe files, seeding."""
