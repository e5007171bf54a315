// Evaluates AWS requests against IAM policies with @cloud-copilot/iam-simulate (AWS's
// evaluation logic: explicit deny, identity and resource policies, conditions, wildcards).
// stdin: a JSON list of {principal, action, resource, account, context, identityPolicies,
// resourcePolicy?}; stdout: a JSON list of {result, errors} in the same order, where result is
// "Allowed", "ImplicitlyDenied" or "ExplicitlyDenied" (null when the simulation was invalid).
import { runSimulation } from '@cloud-copilot/iam-simulate';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const requests = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const answers = [];
for (const r of requests) {
  const simulation = {
    request: {
      principal: r.principal,
      action: r.action,
      resource: { resource: r.resource, accountId: r.account },
      contextVariables: r.context ?? {},
    },
    identityPolicies: (r.identityPolicies ?? []).map((policy, i) => ({ name: `policy-${i}`, policy })),
    serviceControlPolicies: [],
    resourceControlPolicies: [],
    resourcePolicy: r.resourcePolicy ?? undefined,
  };
  const outcome = await runSimulation(simulation, {});
  answers.push({
    result: outcome.errors ? null : outcome.overallResult ?? outcome.result?.analysis?.result ?? null,
    errors: outcome.errors ?? null,
  });
}
process.stdout.write(JSON.stringify(answers));
