'use strict';
// HTTP API: POST /visits/<page> records a visit, GET /visits/<page> reads the total.

const http = require('node:http');
const { Pool } = require('pg');
const { createClient } = require('redis');
const { countVisits, migrate, recordVisit } = require('./visits');

const PAGE_PATH = /^\/visits\/([a-z0-9-]{1,64})$/;

function createServer(pool, redis) {
  return http.createServer(async (request, response) => {
    const match = PAGE_PATH.exec(request.url);
    const send = (status, body) => {
      response.writeHead(status, { 'content-type': 'application/json' });
      response.end(JSON.stringify(body));
    };
    if (!match) {
      send(404, { error: 'expected /visits/<page> (lowercase letters, digits, dashes)' });
      return;
    }
    const page = match[1];
    try {
      if (request.method === 'POST') {
        send(201, { page, visits: await recordVisit(pool, redis, page) });
      } else if (request.method === 'GET') {
        send(200, { page, visits: await countVisits(pool, redis, page) });
      } else {
        send(405, { error: 'use GET or POST' });
      }
    } catch (error) {
      send(500, { error: error.message });
    }
  });
}

async function main() {
  const pool = new Pool({ connectionString: process.env.DATABASE_URL });
  const redis = createClient({ url: process.env.REDIS_URL });
  await redis.connect();
  await migrate(pool);
  const port = Number(process.env.PORT || 3000);
  createServer(pool, redis).listen(port, () => {
    console.log(`visit counter listening on http://localhost:${port}`);
  });
}

if (require.main === module) {
  main().catch((error) => {
    console.error(error);
    process.exit(1);
  });
}

module.exports = { createServer };
