"""The request and response bodies of the token API and the admin API, as pydantic models.

Handlers parse requests and build responses with them, and the OpenAPI document is
generated from the same models (gateway.http.openapi), so the document cannot drift from
what the handlers do. The field types (``fields``) validate with the messages the APIs
have always answered, and describe themselves in the document.
"""
