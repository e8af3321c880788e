"""The outside world, no Prefect imports. Each connector plays one role from the core
(certpilot.issuance.Issuer, ...) or one defined here beside it (challenges.ChallengeSolver).

acme_issuer   ACME CAs (RFC 8555) with ARI (RFC 9773), proven against pebble
private_ca    certpilot's own CA as an Issuer; http_service serves its CRLs, certificates and OCSP (uvicorn)
challenges    http-01, dns-01 (pebble-challtestsrv, Route53) and tls-alpn-01 solvers
"""
