"""HTTP layer: routes, schemas and errors. No torch here."""
