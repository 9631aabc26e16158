// The interop conversation, spoken by @grpc/grpc-js: grant, queue, cancel,
// release, and shutdown (hearing `revoked {reason: SHUTDOWN}` before the
// stream's UNAVAILABLE). Usage: node conversation.js ADDRESS BROKER_PID PROTO_DIR
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [address, brokerPid, protoDir] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(protoDir, 'gpulease/v1/lease.proto'), {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { LeaseBroker } = grpc.loadPackageDefinition(definition).gpulease.v1;
const client = new LeaseBroker(address, grpc.credentials.createInsecure(), {
  // Over a Unix socket, an authority that is a plain host name.
  'grpc.default_authority': 'localhost',
});

const TIMEOUT_MS = 20000;

function fail(message) {
  console.error(`grpc-js: ${message}`);
  process.exit(1);
}

// One AcquireLease call whose events and end can be awaited in order.
function open(consumer) {
  const call = client.AcquireLease();
  const events = [];
  const waiters = [];
  let ended = null;
  const wake = () => {
    while (waiters.length > 0 && (events.length > 0 || ended)) {
      waiters.shift()();
    }
  };
  call.on('data', (event) => {
    events.push(event);
    wake();
  });
  call.on('status', (status) => {
    ended = status;
    wake();
  });
  call.on('error', () => {}); // the status says it all
  call.write({ acquire: { consumer } });
  const next = () =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${consumer}: no event in time`)), TIMEOUT_MS);
      const take = () => {
        clearTimeout(timer);
        resolve(events.length > 0 ? { event: events.shift() } : { status: ended });
      };
      if (events.length > 0 || ended) take();
      else waiters.push(take);
    });
  return { call, next, consumer };
}

async function expectEvent(lease, kind) {
  const got = await lease.next();
  if (!got.event || got.event.kind !== kind) {
    fail(`${lease.consumer}: expected ${kind}, got ${JSON.stringify(got)}`);
  }
  return got.event[kind];
}

async function expectEnd(lease, code) {
  for (;;) {
    const got = await lease.next();
    if (got.event && got.event.kind === 'queued') continue;
    if (!got.status || got.status.code !== code) {
      fail(`${lease.consumer}: expected status ${code}, got ${JSON.stringify(got)}`);
    }
    return got.status;
  }
}

async function main() {
  const a = open('interop-a');
  const granted = await expectEvent(a, 'granted');
  console.log(`grpc-js: granted token ${granted.fencing_token}`);

  const b = open('interop-b');
  const queued = await expectEvent(b, 'queued');
  if (queued.position !== 1) fail(`interop-b queued at ${queued.position}`);
  const c = open('interop-c');
  await expectEvent(c, 'queued');
  console.log('grpc-js: two queued');

  // Cancel a wait: release before the grant, then half-close.
  c.call.write({ release: {} });
  c.call.end();
  await expectEnd(c, grpc.status.OK);
  console.log('grpc-js: cancelled a wait');

  // Release the lease: the next in line is granted, with a higher token.
  a.call.write({ release: {} });
  a.call.end();
  await expectEnd(a, grpc.status.OK);
  const next = await expectEvent(b, 'granted');
  if (BigInt(next.fencing_token) <= BigInt(granted.fencing_token)) {
    fail(`tokens did not increase: ${granted.fencing_token} then ${next.fencing_token}`);
  }
  console.log(`grpc-js: released; next granted token ${next.fencing_token}`);

  // Shutdown: the holder hears why its lease ended, then UNAVAILABLE.
  process.kill(Number(brokerPid), 'SIGTERM');
  const revoked = await expectEvent(b, 'revoked');
  if (revoked.reason !== 'REVOKE_REASON_SHUTDOWN') fail(`revoked for ${revoked.reason}`);
  await expectEnd(b, grpc.status.UNAVAILABLE);
  console.log('grpc-js: heard revoked SHUTDOWN');
  client.close();
}

main().then(
  () => process.exit(0),
  (error) => fail(error.stack || String(error)),
);
