// Sample API keys for development (seed 002):  cat sample.js | mongosh
// Without mongosh:  uv run scripts/sample_keys.py   (same keys, works on the embedded DB)
// `secret` is the SHA-256 hex of the token; the proxy never stores tokens themselves.
db = db.getSiblingDB("cgc");
[
  { token: "token1", user_id: "user1", date_expiry: null },
  { token: "token2", user_id: "user2", date_expiry: null },
  { token: "token-expired", user_id: "user3", date_expiry: new Date("2020-01-01T00:00:00Z") },
].forEach(function (key) {
  const secret = crypto.createHash("sha256").update(key.token).digest("hex");
  db.api_keys.updateOne(
    { secret: secret },
    { $set: { secret: secret, access_level: "COMPLETION", user_id: key.user_id,
              date_expiry: key.date_expiry } },
    { upsert: true },
  );
  print(key.token + " -> " + key.user_id);
});
